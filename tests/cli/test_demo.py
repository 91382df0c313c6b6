"""The flashmoba command table and the demo command (flashmoba.cli, flashmoba.cli.demo)."""

from flashmoba.cli import main


def test_demo_runs_and_its_checks_pass(capsys):
    assert main(["demo", "--seqlen", "300", "--heads", "2", "--head-dim", "16", "--block-size", "32"]) == 0
    output = capsys.readouterr().out
    assert "ok" in output and "FAIL" not in output


def test_cli_help_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    assert main(["no-such-command"]) == 2
