"""The flashmoba command table and the demo command (flashmoba.cli, flashmoba.cli.demo)."""

import pytest

from flashmoba.cli import main


def test_demo_runs_and_its_checks_pass(capsys):
    assert main(["demo", "--seqlen", "300", "--heads", "2", "--head-dim", "16", "--block-size", "32"]) == 0
    output = capsys.readouterr().out
    assert "ok" in output and "FAIL" not in output


def test_cli_help_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    assert main(["no-such-command"]) == 2


def _refuse(*_args, **_kwargs):
    raise AssertionError("a bad flag must fail before any computation")


NO_INTERPRETER = {"TRITON_INTERPRET": None}  # the environment of a machine without Triton's interpreter


@pytest.mark.parametrize(
    "flags, message, environment",
    [
        (["--seqlen", "0"], "argument --seqlen: must be >= 1, got 0", {}),
        (["--seqlen", "many"], "argument --seqlen: expected an int, got 'many'", {}),
        (["--heads", "-2"], "argument --heads: must be >= 1, got -2", {}),
        (["--head-dim", "0"], "argument --head-dim: must be >= 1, got 0", {}),
        (["--head-dim", "512", "--backend", "triton"], "argument --head-dim: must be <= 256", {}),
        (["--block-size", "0"], "argument --block-size: must be >= 1, got 0", {}),
        (["--block-size", "1.5"], "argument --block-size: expected an int, got '1.5'", {}),
        (["--topk", "0"], "argument --topk: must be >= 1, got 0", {}),
        (["--device", "no-such-device"], "argument --device: not a torch device, got 'no-such-device'", {}),
        (["--device", "cuda:99"], "argument --device:", {}),
        (["--backend", "fast"], "argument --backend: invalid choice: 'fast'", {}),
        (["--device", "cpu", "--backend", "triton"], "argument --backend: 'triton'", NO_INTERPRETER),
    ],
)
def test_demo_refuses_bad_flags_before_any_work(flags, message, environment, capsys, monkeypatch):
    from flashmoba.cli import demo

    for name in ("moba_attn", "moba_select", "_dense", "_clustered_keys"):
        monkeypatch.setattr(demo, name, _refuse)
    for variable, value in environment.items():
        if value is None:
            monkeypatch.delenv(variable, raising=False)
        else:
            monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as raised:
        main(["demo", *flags])
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


def test_a_command_s_user_error_is_one_line_and_exit_status_1(monkeypatch, capsys, tmp_path):
    """A mistake in what a command was given is a message naming it, not a traceback; with
    FLASHMOBA_TRACEBACK set, the exception itself."""
    monkeypatch.delenv("FLASHMOBA_TRACEBACK", raising=False)
    missing = str(tmp_path / "no_such_run")
    assert main(["eval", "--checkpoint", missing]) == 1
    err = capsys.readouterr().err
    assert err.startswith("flashmoba eval: error: ") and "no_such_run" in err and "Traceback" not in err
    monkeypatch.setenv("FLASHMOBA_TRACEBACK", "1")
    with pytest.raises((ValueError, OSError)):
        main(["eval", "--checkpoint", missing])
