"""The router's signal-to-noise model (paper section 2, App. B) as a tool, checked by simulation.

- ``flashmoba.snr.theory``: the paper's formulas (``snr``, ``failure_probability = Phi(-SNR)``,
  ``required_snr``), the top-k ``retrieval_probability`` they imply, the exact unit-vector
  ``sphere_failure_probability`` (no central limit step), the normal distribution and ``wilson_interval``;
- ``flashmoba.snr.simulation``: ``simulate_router``, a Monte-Carlo simulation of the paper's setup;
- ``flashmoba.snr.measurement``: ``measure_router_snr``, the model's quantities on the q and k of a real
  attention layer, predicted against measured router recall;
- ``flashmoba.snr.capture``: ``planted_needle_qk`` (synthetic q/k) and ``capture_qk`` (q/k of a model's
  MoBA layers).

The command is ``flashmoba snr`` (``flashmoba.cli.snr``); docs/snr.md walks through both.
"""

from flashmoba.snr.capture import capture_qk, planted_needle_qk
from flashmoba.snr.measurement import RouterMeasurement, RouterSnrAccumulator, measure_router_snr
from flashmoba.snr.simulation import DOT_PRODUCT_LAWS, RouterSimulation, simulate_router
from flashmoba.snr.theory import (
    delta_mu_eff,
    failure_probability,
    normal_cdf,
    normal_ppf,
    required_snr,
    retrieval_probability,
    snr,
    sphere_failure_probability,
    wilson_interval,
)

__all__ = [
    "DOT_PRODUCT_LAWS",
    "RouterMeasurement",
    "RouterSimulation",
    "RouterSnrAccumulator",
    "capture_qk",
    "delta_mu_eff",
    "failure_probability",
    "measure_router_snr",
    "normal_cdf",
    "normal_ppf",
    "planted_needle_qk",
    "required_snr",
    "retrieval_probability",
    "simulate_router",
    "snr",
    "sphere_failure_probability",
    "wilson_interval",
]
