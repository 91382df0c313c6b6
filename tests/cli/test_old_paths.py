"""The commands' and libraries' old import paths re-export the new homes, and the commands stay lazy."""

import subprocess
import sys

import flashmoba


def test_old_module_paths_re_export_the_new_homes():
    from flashmoba import bench, demo, snr, snr_cli
    from flashmoba.bench import timing
    from flashmoba.cli import demo as demo_command
    from flashmoba.cli import snr as snr_command
    from flashmoba.nn import attention, functional
    from flashmoba.snr import simulation

    assert snr_cli.main is snr_command.main and demo.main is demo_command.main
    assert (
        bench.time_cuda_ms is timing.time_cuda_ms
        and bench._file_stem("NVIDIA H100 80GB") == "NVIDIA_H100_80GB"
    )
    assert snr.simulate_router is simulation.simulate_router and callable(snr.snr)
    assert attention.rotary_embedding is functional.rotary_embedding
    assert attention.sliding_window_attention is functional.sliding_window_attention


def test_import_flashmoba_loads_no_command_triton_or_plotting():
    code = (
        "import sys, flashmoba, flashmoba.snr, flashmoba.bench, flashmoba.nn; "
        "loaded = [m for m in ('triton', 'matplotlib', 'flashmoba.cli') if m in sys.modules]; "
        "print(loaded); sys.exit(1 if loaded else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_python_dash_m_flashmoba_lists_the_commands():
    result = subprocess.run([sys.executable, "-m", "flashmoba", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("demo", "bench", "train", "eval", "snr"):
        assert f"  {command} " in result.stdout
    assert flashmoba.__version__
