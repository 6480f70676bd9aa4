"""The installable package: pyproject.toml in step with requirements*.txt and the checkout's scripts, and
`pip install .` into a fresh virtual environment whose console scripts then train and sample from a
directory outside the checkout."""

import ast
import json
import os
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    PYPROJECT = tomllib.load(f)
PROJECT = PYPROJECT["project"]
SCRIPTS = PROJECT["scripts"]
EXTRA_FILES = {"app": "requirements-app.txt", "export": "requirements-export.txt"}


def read_requirements(name: str) -> tuple[list[str], list[str]]:
    """(the requirements, the files it includes with -r) of a requirements file, comments dropped."""
    reqs, included = [], []
    with open(os.path.join(REPO, name)) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line.startswith("-r "):
                included.append(line[3:].strip())
            elif line:
                reqs.append(line)
    return reqs, included


def floors(reqs) -> dict[str, str]:
    """{normalized name: its version specifier}, e.g. {"orbax-checkpoint": ">=0.11.17"}."""
    parsed = [Requirement(r) for r in reqs]
    out = {canonicalize_name(r.name): str(r.specifier) for r in parsed}
    assert len(out) == len(parsed), f"a package named twice in {reqs}"
    return out


def test_pyproject_dependencies_are_the_requirements_files_floors():
    """pip install . (or .[app], .[export], .[dev]) asks for what pip install -r requirements*.txt does."""
    assert floors(PROJECT["dependencies"]) == floors(read_requirements("requirements.txt")[0])
    assert floors(PROJECT["dependencies"])["jax"] == ">=0.7.2"  # Colab's preinstalled JAX satisfies it
    extras = PROJECT["optional-dependencies"]
    for extra, name in EXTRA_FILES.items():
        reqs, included = read_requirements(name)
        assert floors(extras[extra]) == floors(reqs) and not included, extra
    # dev = requirements-dev.txt: its own lines, and the files it includes as this package's extras.
    dev, included = read_requirements("requirements-dev.txt")
    self_refs = [
        Requirement(r) for r in extras["dev"] if canonicalize_name(Requirement(r).name) == "orpheus-jax"
    ]
    others = [r for r in extras["dev"] if canonicalize_name(Requirement(r).name) != "orpheus-jax"]
    assert floors(others) == floors(dev)
    assert "requirements.txt" in included  # the base dependencies come with the package itself
    assert len(self_refs) == 1 and self_refs[0].extras == {
        extra for extra, name in EXTRA_FILES.items() if name in included
    }
    assert set(included) <= {"requirements.txt", *EXTRA_FILES.values()}


@pytest.mark.slow
def test_every_console_script_resolves_to_the_main_its_checkout_script_runs():
    """Each orpheus-NAME is module:function naming a callable (imported in a fresh interpreter, so the
    CLIs' absl flags stay out of this one), and the checkout's NAME.py runs the same main()."""
    expected = {"train", "sample", "app", "export", "import_seed", "plot"}
    assert set(SCRIPTS) == {"orpheus-" + name.replace("_", "-") for name in expected}
    check = (
        "import importlib, json, sys\n"
        "out = {}\n"
        "for name, target in json.loads(sys.argv[1]).items():\n"
        "    module, _, attr = target.partition(':')\n"
        "    obj = importlib.import_module(module)\n"
        "    for part in attr.split('.'):\n"
        "        obj = getattr(obj, part)\n"
        "    out[name] = callable(obj)\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", check, json.dumps(SCRIPTS)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {name: True for name in SCRIPTS}
    for name in expected:
        with open(os.path.join(REPO, f"{name}.py")) as f:
            tree = ast.parse(f.read())
        imports = {
            (n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names
        }
        module, _, attr = SCRIPTS["orpheus-" + name.replace("_", "-")].partition(":")
        assert (module, attr) in imports, f"{name}.py should run {module}:{attr}"


def test_checkout_configs_are_the_shipped_ones():
    """configs/NAME.py (for --config configs/NAME.py) is orpheus_jax/configs/NAME.py (--config NAME)."""
    import importlib

    from orpheus_jax import configs

    shipped = sorted(
        f[:-3] for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py") and f != "__init__.py"
    )
    assert shipped == configs.names() and {configs.SEED, configs.CPU, "tiny"} <= set(shipped)
    for name in shipped:
        checkout = importlib.import_module(f"configs.{name}")
        assert checkout.get_config is importlib.import_module(f"orpheus_jax.configs.{name}").get_config
        assert configs.resolve(name) == configs.path(name) and os.path.isfile(configs.path(name))


def python_path(python: str) -> list[str]:
    """The module search path of an interpreter, without the current directory or $PYTHONPATH."""
    out = subprocess.run(
        [python, "-E", "-P", "-c", "import json, sys; print(json.dumps(sys.path))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return json.loads(out)


@pytest.mark.slow
def test_pip_install_then_train_and_sample_outside_the_checkout(small_text_path, tmp_path):
    """A real `pip install .` (build backend, dependency metadata, console scripts) into a fresh venv made
    outside the checkout. Nothing is downloaded: the venv sees this interpreter's installed packages
    through a .pth file, so pip finds every requirement satisfied (--no-index makes sure of it), and
    the build uses this interpreter's setuptools (--no-build-isolation)."""
    try:
        setuptools_version = Version(metadata.version("setuptools"))
    except metadata.PackageNotFoundError:
        setuptools_version = None
    build_requires = Requirement(PYPROJECT["build-system"]["requires"][0])
    if setuptools_version is None or setuptools_version not in build_requires.specifier:
        pytest.fail(
            f"the build needs {build_requires}, not {setuptools_version}: pip install -r requirements-dev.txt"
        )

    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = str(env_dir / "bin" / "python")
    site = subprocess.run(
        [python, "-E", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # This interpreter's site-packages (and what its .pth files add), never the checkout: after the
    # venv's own site-packages, so the package installed there is the one imported.
    fresh = set(python_path(python))
    inherited = [
        p
        for p in python_path(sys.executable)
        if p not in fresh and os.path.isdir(p) and not os.path.abspath(p).startswith(REPO + os.sep)
    ]
    assert inherited and os.path.abspath(REPO) not in map(os.path.abspath, inherited)
    with open(os.path.join(site, "_orpheus_test_inherited.pth"), "w") as f:
        f.write("".join(p + "\n" for p in inherited))

    # The sources pip builds from, copied so the build's own files (build/, *.egg-info) stay out of the
    # checkout: what pyproject.toml packages, and the files its metadata names.
    src = tmp_path / "src"
    shutil.copytree(
        os.path.join(REPO, "orpheus_jax"), src / "orpheus_jax", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(REPO, name), src / name)
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PIP_REQUIRE_VIRTUALENV")
    }
    env["ORPHEUS_CACHE"] = str(tmp_path / "cache")
    pip = subprocess.run(
        [
            python,
            "-m",
            "pip",
            "install",
            "--no-index",
            "--no-build-isolation",
            "--no-cache-dir",
            "--disable-pip-version-check",
            ".",
        ],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    satisfied = {
        canonicalize_name(Requirement(line.split(": ", 1)[1].split(" in ", 1)[0]).name)
        for line in pip.stdout.splitlines()
        if line.startswith("Requirement already satisfied: ")
    }
    assert set(floors(PROJECT["dependencies"])) <= satisfied, pip.stdout
    assert "Successfully installed orpheus-jax-0.1.0" in pip.stdout, pip.stdout
    installed = sorted(os.listdir(site))
    assert "orpheus_jax" in installed and "configs" not in installed, installed
    for name in SCRIPTS:
        assert os.access(env_dir / "bin" / name, os.X_OK), name

    elsewhere = tmp_path / "elsewhere"  # neither the checkout nor the sources: the installed package
    elsewhere.mkdir()
    where = subprocess.run(
        [python, "-c", "import orpheus_jax.configs as c; print(c.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert where.returncode == 0 and where.stdout.startswith(site + os.sep), where.stdout + where.stderr

    def run(name, *args):
        return subprocess.run(
            [str(env_dir / "bin" / name), *args],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    workdir = str(tmp_path / "run")
    train = run(
        "orpheus-train",
        "--config",
        "tiny",
        "--workdir",
        workdir,
        "--data",
        small_text_path,
        "--config.max_iters=4",
        "--config.eval_interval=4",
        "--config.checkpoint_interval=4",
        "--config.cpu_dots=xla",  # compiles faster than oneDNN's steps
    )
    assert train.returncode == 0, train.stderr
    assert "step 4: train loss" in train.stdout and "Traceback" not in train.stderr, train.stdout
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["4"]

    sample = run("orpheus-sample", "--workdir", workdir, "--max_new_tokens", "20")
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("\n") and len(sample.stdout) == 1 + 20 + 1, repr(sample.stdout)

    missing = run("orpheus-sample", "--workdir", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and missing.stderr.strip().splitlines() == [
        f"error: no such workdir: {tmp_path / 'nowhere'}"
    ], missing.stderr
