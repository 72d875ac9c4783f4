"""The README's commands are the interface of a new user: keep .ci/run running the README's test command."""

from pathlib import Path

import autopar

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = text.split("```bash\n")[1:3]
    return [b.split("\n```")[0].strip() for b in blocks]


def test_ci_runs_the_readme_test_command():
    setup_and_run, tests = _commands()
    assert "pytest" in tests and tests.startswith("python3 -m pip install torch==2.13.0")
    assert setup_and_run.startswith("python3 -m pip install torch==2.13.0")
    assert tests in (ROOT / ".ci" / "run").read_text()


def test_strategies_and_cost_models_ship_inside_the_package():
    import autopar.cost_models as cm
    import autopar.strategies as st

    assert Path(st.__file__).parent.name == "strategies" and "matmul" in dir(st)
    assert set(cm.available_hardware()) >= {"a100-80gb-sxm", "h100-80gb-sxm", "cpu"}
    assert callable(autopar.compile)
