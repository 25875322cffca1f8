#!/usr/bin/env bash
# One GPU session's checks in one call (device time is short), most wanted first: the CUDA
# tests, the speed benchmark and a profile of a graphed `linear` run alone on the card, then
# the zoo's families with what budget is left (each finished run's metrics are kept, so a
# cut-off step still gives its rows). Opt in: the 25-epoch graphed-vs-eager quality pair and
# the deep30 recipes in parallel (quality only: their times are not speed claims). Each step
# has its own time limit, a failure does not stop the next, and everything lands in one
# tarball.
#
#   bash bench/gpu_check.sh OUTDIR [SECONDS]   # SECONDS: the whole script's budget (540)
#   STEPS=zoo bash bench/gpu_check.sh OUTDIR    # only the zoo, with the whole budget
#   STEPS=quality DEEP30='.*' DEEP_EPOCHS=100 bash bench/gpu_check.sh OUTDIR  # every recipe
#
# Offline machines: wheels in .whl/ (hydra-core, omegaconf, antlr4) are installed to
# /tmp/site, and MNIST in .carry/MNIST/raw/*.gz is unpacked to /tmp/data (AE_DATA_ROOT);
# bench/gpu_prepare.sh builds both folders here.
set -u
OUT=${1:?usage: bash bench/gpu_check.sh OUTDIR [SECONDS]}
BUDGET=${2:-540}
START=$(date +%s)
RES=$OUT/res
mkdir -p "$RES"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
if [ -d .carry/MNIST/raw ]; then
    mkdir -p /tmp/data/MNIST/raw
    for f in .carry/MNIST/raw/*.gz; do gunzip -c "$f" >"/tmp/data/MNIST/raw/$(basename "$f" .gz)"; done
    export AE_DATA_ROOT=/tmp/data
fi
nvidia-smi --query-gpu=name,driver_version,memory.used,clocks.sm --format=csv | tee "$RES/gpu.txt"
python3 -c "import torch, pytorch_lightning as pl, hydra; print('torch', torch.__version__,
'lightning', pl.__version__, 'hydra', hydra.__version__, torch.cuda.get_device_name())" \
    | tee -a "$RES/gpu.txt"

left() { echo $((BUDGET - ($(date +%s) - START) - 25)); }
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to res/NAME.log, show the tail
    local name=$1 limit=$2 t0=$(date +%s) rc
    shift 2
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@" >"$RES/$name.log" 2>&1
    rc=$?
    echo "=== $name: exit $rc after $(($(date +%s) - t0)) s"
    tail -n "${TAIL:-15}" "$RES/$name.log"
}

# 1. The CUDA tests (graphed vs eager, schedule, resume, figures on the GPU) and the engine's.
STEPS=${STEPS:-tests speed zoo}  # a later session may rerun one part
[[ $STEPS == *tests* ]] && TAIL=8 step tests 150 python3 -m pytest -q -p no:cacheprovider -o addopts= \
    tests/test_engine.py tests/test_train.py::test_runs_on_the_gpu_when_there_is_one

# 2. Speed, alone on the card.
[[ $STEPS == *speed* ]] && TAIL=6 step speed 240 python3 bench/speed.py --device cuda --json "$RES/speed.json"

# 2a. Where a graphed `linear` epoch's time goes (issue 21 item 5: 1.99x the graphed plain
# loop on an H100, target 1.3x): Lightning's simple profiler over the speed benchmark's
# settings (checkpoints on, figures off), alone on the card.
[[ $STEPS == *speed* ]] && TAIL=40 step profile 120 python3 train.py model=linear trainer=gpu \
    debug=profile trainer.max_epochs=15 callbacks=none run_dir=/tmp/profile_linear \
    && cp /tmp/profile_linear/fit-profile.txt "$RES/linear-fit-profile.txt"

# 2b. The zoo on the card: every family's seconds per epoch with CUDA graphs where its
# maths allows, plus its quality row, with the budget left. Alone on the card, as the speed
# step: its s/epoch column is a speed claim. The finished runs' metrics.json are copied even
# when the step is cut off (the table is then built from them).
if [[ $STEPS == *zoo* ]]; then
    TAIL=14 step zoo "$(left)" python3 bench/quality.py --device cuda \
        --sections families --epochs "${ZOO_EPOCHS:-25}" --family-bottlenecks 16 \
        --runs-dir /tmp/zoo --json "$RES/zoo16.json" --markdown "$RES/zoo16.md"
    for f in /tmp/zoo/families_z16/*/metrics.json; do
        [ -f "$f" ] && cp "$f" "$RES/zoo16_$(basename "$(dirname "$f")")_metrics.json"
    done
fi

# 3. Quality, in parallel (one CPU thread each): the documented command graphed and eager;
# the deep30 recipes not yet run on a GPU (the H100 table has the first 19; DEEP30='.*': all).
export OMP_NUM_THREADS=1
pids=()
for mode in $([[ $STEPS == *quality* ]] && echo true false); do
    timeout "$(left)" python3 train.py model=hidden1024 bottleneck=10 trainer=gpu \
        engine.cuda_graphs=$mode run_dir=/tmp/h1024_z10_graphs_$mode \
        >"$RES/h1024_graphs_$mode.log" 2>&1 &
    pids+=($!)
done
if [[ $STEPS == *quality* ]]; then
    i=0
    while read -r recipe; do
        i=$((i + 1))
        timeout "$(left)" python3 bench/quality.py --device cuda --sections deep30 \
            --deep-recipes "$recipe" --deep-epochs "${DEEP_EPOCHS:-150}" \
            --json "$RES/deep30_$i.json" --runs-dir /tmp/deep30 \
            >"$RES/deep30_$i.log" 2>&1 &
        pids+=($!)
    done < <(python3 -c "import sys; sys.path.insert(0, 'bench'); import quality
print('\n'.join(quality.DEEP_RECIPES))" | grep -x -E "${DEEP30:-experiment=deep30|deep30 .*}")
fi
for pid in "${pids[@]}"; do wait "$pid"; done
echo "=== quality runs done after $(($(date +%s) - START)) s"
for mode in $([[ $STEPS == *quality* ]] && echo true false); do
    cp /tmp/h1024_z10_graphs_$mode/metrics.json "$RES/h1024_graphs_${mode}_metrics.json"
    python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print(sys.argv[2],
{k: m.get(k) for k in ('test/mse', 'global_step', 'train_time_s')},
'median epoch', sorted(m['epoch_times_s'])[len(m['epoch_times_s'])//2])" \
        "$RES/h1024_graphs_${mode}_metrics.json" "graphs=$mode"
    grep -h "training steps" "$RES/h1024_graphs_$mode.log" | head -2
done
cp /tmp/h1024_z10_graphs_true/figures/*.png "$RES/" 2>/dev/null
grep -hs "^| " "$RES"/deep30_*.log | sort -u
tar czf "$OUT/results.tgz" -C "$OUT" res && rm -rf "$RES"
echo "=== all done after $(($(date +%s) - START)) s"
