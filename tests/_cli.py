"""Calling the CLI in-process, as the tests of several commands do."""

from digitjax import cli


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of `digitjax ARGV...`."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err
