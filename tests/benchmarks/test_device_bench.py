"""scripts/device_bench.sh, the one GPU-machine call behind the README's GPU tables: it parses, its header lists
every stage it runs, and every benchmark option it passes exists."""
import re
import subprocess
import sys

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "device_bench.sh"


def test_the_script_parses_and_its_header_names_every_stage():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    stages = set(re.findall(r"\bhas ([a-z0-9-]+)", text)) - {"\"$1\""}
    header = text.split("set -uo pipefail")[0]
    assert stages and not [s for s in stages if not re.search(rf"(?<![a-z-]){re.escape(s)}(?![a-z-])", header)]


def test_every_loopback_option_it_passes_exists():
    text = SCRIPT.read_text().replace("\\\n", " ")
    usage = subprocess.run([sys.executable, str(REPO / "benchmarks" / "loopback.py"), "--help"], capture_output=True,
                           text=True, check=True, cwd=REPO).stdout
    known = set(re.findall(r"(--[a-z][a-z0-9-]*)", usage))
    passed = set()
    for line in re.findall(r"(?:benchmarks/loopback\.py|lb \d+)([^\n;]*)", text):
        passed |= set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", line))
    assert passed and passed <= known, sorted(passed - known)
