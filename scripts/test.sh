#!/usr/bin/env bash
# Set up and run the test suite. With no option: every tier: unit, distributed (2 CPU ranks through the
# deepspeed launcher) and SLURM (a real single-node SLURM brought up by the fixture; installed here with
# apt-get when missing and we are root). Extra arguments go to pytest (e.g. -m "not slurm").
# Tiers (pyproject.toml's markers): `--fast` runs the fast tier only (tests with none of the markers
# slow, distributed, slurm, multinode, readme: in-process, about 2 minutes on 2 cores);
# `--integration` the `slow` tests (training runs, `mgt` subprocesses, DeepSpeed engines); the
# end-to-end tier is `-m "distributed or slurm or multinode or readme"`.
set -euo pipefail
cd "$(dirname "$0")/.."
FAST_TIER="not slow and not distributed and not slurm and not multinode and not readme"
tier=()
case "${1:-}" in
  --fast) tier=(-m "$FAST_TIER"); shift ;;
  --integration) tier=(-m "slow and not distributed and not slurm and not multinode and not readme"); shift ;;
esac
if [ ${#tier[@]} = 0 ] && ! command -v slurmctld >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge) >/dev/null \
    || echo "warning: could not install slurm-wlm/munge: SLURM tests will be skipped"
fi
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=offline
# The suite tests the CPU paths (gloo, bit-exact fp32, torch.compile on CPU), also on a machine with GPUs;
# bench/gpu_check.sh holds the GPU checks.
export CUDA_VISIBLE_DEVICES=""
exec .venv/bin/python -m pytest -q -p no:cacheprovider --timeout 1200 "${tier[@]}" "$@" tests
