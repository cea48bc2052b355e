#!/usr/bin/env bash
# Sets up this checkout in the active Python environment (a virtual environment is recommended):
#   1. torch==2.13.0, only when that version is missing. Plain `pip install torch==2.13.0` gets the
#      CPU build only where pip is configured to serve it; on a stock CPU machine install it first
#      from https://download.pytorch.org/whl/cpu and this step keeps it. Installing torch before
#      anything else keeps a loose requirement from pulling a newer torch with CUDA packages.
#   2. requirements.txt, only when one of its requirements is missing or at a wrong version.
#   3. this package, editable (`pip install -e .`: engine and kernels import from the checkout), with
#      its C++ extension engine._C compiled once, into engine/. Skipped when engine imports from this
#      checkout and engine/_C is newer than csrc/, setup.py and pyproject.toml.
# Safe to run again: with everything in place it installs and builds nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# The installed version is read from package metadata: importing torch would take seconds.
if ! $PY -c "import importlib.metadata as m, sys; sys.exit(0 if m.version('torch').startswith('2.13.0') else 1)" \
    2>/dev/null; then
  $PY -m pip install --quiet torch==2.13.0
fi

requirements_met() {
  $PY - <<'EOF' 2>/dev/null
import importlib.metadata, sys
from packaging.requirements import Requirement
for line in open("requirements.txt", encoding="utf-8"):
    spec = line.split("#", 1)[0].strip()
    if not spec:
        continue
    requirement = Requirement(spec)
    try:
        installed = importlib.metadata.version(requirement.name)
    except importlib.metadata.PackageNotFoundError:
        sys.exit(1)
    if not requirement.specifier.contains(installed, prereleases=True):
        sys.exit(1)
EOF
}
if ! requirements_met; then
  $PY -m pip install --quiet -r requirements.txt
fi

# Run from / so that the answer comes from the installed package, not from the current directory.
package_current() (
  CHECKOUT=$(pwd -P)
  export CHECKOUT
  cd /
  $PY - <<'EOF' 2>/dev/null
import glob, importlib.metadata, os, sys
import engine._C
checkout = os.environ["CHECKOUT"]
importlib.metadata.version("ltu-engine")
if os.path.realpath(engine.__file__) != os.path.join(checkout, "engine", "__init__.py"):
    sys.exit(1)
extension = os.path.realpath(engine._C.__file__)
if os.path.dirname(extension) != os.path.join(checkout, "engine"):
    sys.exit(1)
sources = glob.glob(os.path.join(checkout, "csrc", "*")) + [
    os.path.join(checkout, name) for name in ("setup.py", "pyproject.toml")]
sys.exit(0 if os.path.getmtime(extension) >= max(map(os.path.getmtime, sources)) else 1)
EOF
)
if ! package_current; then
  # The build tools come from requirements.txt (step 2), so no isolated build environment is made;
  # the editable build compiles engine._C once and places it in engine/.
  $PY -m pip install --quiet --no-build-isolation -e .
fi
