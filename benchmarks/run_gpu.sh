#!/usr/bin/env bash
# The GPU scale of the benchmarks on one GPU, in parts that each take a few minutes:
#
#   bash benchmarks/run_gpu.sh essentials [DEST]  # for a short lease (one call of under 10 minutes): the GPU
#                                               # tests, the eager step cost of the 4 models, then the compiled
#                                               # one of the ViTs, each stage cut off at its share of 9 minutes
#                                               # (tests 2, eager 4, compiled 3) and keeping what it measured
#   bash benchmarks/run_gpu.sh eager [DEST]     # tests/test_gpu.py, step cost of the 4 models (eager; the ViTs
#                                               # also with timm's PatchDropout step as the speed reference),
#                                               # DMJD vs single-view step throughput, ViT-B/16 and ConViT-B
#   bash benchmarks/run_gpu.sh compiled [DEST]  # step cost with torch.compile (merges into step_cost.json)
#   bash benchmarks/run_gpu.sh checkpointing [DEST]  # step cost with activation checkpointing (merges too)
#   bash benchmarks/run_gpu.sh swin_drop [DEST] # Swin-T's step with the mask token and with adapter swin_drop,
#                                               # in the same rounds (merges into step_cost.json)
#   bash benchmarks/run_gpu.sh peers [DEST]     # the eager step cost again, R-Drop's and cosub's steps (peers.py)
#                                               # in the same rounds (merges into step_cost.json)
#   bash benchmarks/run_gpu.sh accuracy [DEST]  # Fashion-MNIST ViT 6x192, 25 epochs: all 15 runs at once
#   bash benchmarks/run_gpu.sh accuracy_resnet [DEST]
#   bash benchmarks/run_gpu.sh accuracy_peers [DEST]  # the ViT: plain vs MaskSub vs R-Drop vs cosub (peers.py),
#                                               # and plain at MaskSub's compute: 15 runs at once
#   bash benchmarks/run_gpu.sh accuracy_swin [DEST]  # a 2-stage Swin: plain vs MaskSub with the mask token and with
#                                               # swin_drop, and plain runs at each one's compute: 15 runs at once
#   bash benchmarks/run_gpu.sh pretrain [DEST]  # DMJD vs single view on Fashion-MNIST, ViT 6x192: 3 pretraining
#                                               # runs at once, then their 7 probes and finetunes at once
#   bash benchmarks/run_gpu.sh text [DEST]      # text classifiers (BERT-base, SmolLM2-135M, Qwen2.5-0.5B configs):
#                                               # plain vs MaskSub with the attention and the drop mode; then the
#                                               # decoders' causal language models (batch 16 of 512 tokens), and
#                                               # the distillation over Qwen2.5's vocabulary (distill_cost.py)
#   bash benchmarks/run_gpu.sh text_accuracy [DEST]  # WordNet gloss classification, a BERT 4x256 from scratch:
#                                               # plain vs MaskSub (token, drop) vs DropSub, 3 seeds: 12 runs at
#                                               # once, then the 3 plain runs at MaskSub's compute
#   bash benchmarks/run_gpu.sh text_pretrain [DEST]  # BERT's objective on WordNet's glosses, a BERT 4x256: plain vs
#                                               # MaskSub (token, drop), 3 seeds at once, the plain one at
#                                               # MaskSub's compute, then 15 plain fine-tunings on supersenses
#
# Results are written to benchmarks/results/. With DEST, the result files (not the run folders) go
# to DEST as well: the step-cost parts and the test log write there as they go, starting from the
# committed files so that parts merge, so a part cut off by a time limit leaves what it measured in
# DEST; the others copy their files there at the end. Python: $PYTHON (default python, else
# python3). Fashion-MNIST is read from /usr/share/datasets/fashion-mnist or $MASKSUB_FASHION_MNIST, WordNet from
# /usr/share/wordnet (Debian's wordnet-base) or $MASKSUB_WORDNET.
# The checkpointing and peers parts time the eager steps again (their ratios are within one run's
# rounds); a table whose rows came from different runs is left out, so run peers after checkpointing.
# The training parts pass --reuse: run again on the same machine after a time limit cut one off, a
# part reads its finished runs and continues the unfinished ones from their last checkpoint.
set -euo pipefail
part=${1:?"name a part: essentials, eager, compiled, checkpointing, swin_drop, peers, accuracy, accuracy_resnet, accuracy_peers, accuracy_swin, pretrain, text, text_accuracy or text_pretrain"}
dest=${2:+$(realpath -m "$2")}
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}  # some images have only python3
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
RES=benchmarks/results
mkdir -p "$RES"

case $part in
  eager) files="gpu_tests.log step_cost.json step_cost.md pretrain_throughput.json pretrain_throughput.md" ;;
  essentials) files="gpu_tests.log step_cost.json step_cost.md" ;;
  compiled | checkpointing | swin_drop | peers) files="step_cost.json step_cost.md" ;;
  accuracy) files="accuracy_gpu.json accuracy_gpu.md accuracy_gpu.png" ;;
  accuracy_resnet) files="accuracy_gpu_resnet.json accuracy_gpu_resnet.md accuracy_gpu_resnet.png" ;;
  accuracy_peers) files="accuracy_gpu_peers.json accuracy_gpu_peers.md accuracy_gpu_peers.png" ;;
  accuracy_swin) files="accuracy_gpu_swin.json accuracy_gpu_swin.md accuracy_gpu_swin.png" ;;
  pretrain) files="pretrain_gpu.json pretrain_gpu.md" ;;
  text_accuracy) files="text_accuracy_gpu.json text_accuracy_gpu.md text_accuracy_gpu.png" ;;
  text_pretrain) files="text_pretrain_gpu.json text_pretrain_gpu.md text_pretrain_gpu.png" ;;
  text) files="text_step_cost_gpu.json text_step_cost_gpu.md text_step_cost_gpu_lm.json text_step_cost_gpu_lm.md text_step_cost_gpu_vlm.json text_step_cost_gpu_vlm.md distill_cost_gpu.json distill_cost_gpu.md" ;;
  *)
    echo "unknown part '$part': name one of essentials, eager, compiled, checkpointing, swin_drop, peers, accuracy, accuracy_resnet, accuracy_peers, accuracy_swin, pretrain, text, text_accuracy, text_pretrain" >&2
    exit 2 ;;
esac

out=$RES  # where the step-cost parts and the test log write
if [ -n "$dest" ]; then
  mkdir -p "$dest"
  for f in $files; do
    if [ -f "$RES/$f" ] && [ ! "$RES/$f" -ef "$dest/$f" ]; then cp "$RES/$f" "$dest/"; fi
  done
  out=$dest
fi

# The GPU tests run in this one process (-o addopts="": no pytest-xdist workers, which the packages carried to a
# device machine may lack, each holding a CUDA context of its own).
case $part in
  eager)
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu_tests.log"
    $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/test_gpu.py 2>&1 | tee -a "$out/gpu_tests.log" ||
      echo "tests/test_gpu.py FAILED (see gpu_tests.log); the benchmarks go on" | tee -a "$out/gpu_tests.log"
    $PY benchmarks/step_cost.py --compile off --patch-dropout --out "$out"
    $PY benchmarks/pretrain.py --throughput-only --out "$out" ;;
  essentials)
    # each stage's files are written as it goes: a stage cut off by its timeout keeps the models it finished
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu_tests.log"
    timeout 120 $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/test_gpu.py 2>&1 | tee -a "$out/gpu_tests.log" ||
      echo "tests/test_gpu.py FAILED or cut off at 120 s (see gpu_tests.log); the benchmarks go on" |
      tee -a "$out/gpu_tests.log"
    timeout 240 $PY benchmarks/step_cost.py --compile off --warmup 5 --repeats 4 --out "$out" ||
      echo "eager step cost cut off at 240 s: the models it finished are in step_cost.json"
    timeout 180 $PY benchmarks/step_cost.py --compile on --warmup 5 --repeats 4 \
      --models deit3_small_patch16_224,deit3_base_patch16_224 --out "$out" ||
      echo "compiled step cost cut off at 180 s: the models it finished are in step_cost.json" ;;
  compiled) $PY benchmarks/step_cost.py --compile on --out "$out" ;;
  checkpointing) $PY benchmarks/step_cost.py --compile off --grad-checkpointing --patch-dropout --out "$out" ;;
  peers) $PY benchmarks/step_cost.py --compile off --peers --patch-dropout --out "$out" ;;
  swin_drop) $PY benchmarks/step_cost.py --compile off --models swin_tiny_patch4_window7_224 --also-adapter swin_drop \
    --out "$out" ;;
  accuracy) $PY benchmarks/accuracy.py --scale gpu --jobs 15 --reuse ;;
  accuracy_resnet) $PY benchmarks/accuracy.py --scale gpu --jobs 15 --model resnet --reuse ;;
  accuracy_peers) $PY benchmarks/accuracy.py --scale gpu --jobs 15 --subs none,mask,rdrop,cosub --tag peers --reuse ;;
  accuracy_swin) $PY benchmarks/accuracy.py --scale gpu --jobs 15 --model swin --subs none,mask,mask_drop --reuse ;;
  pretrain) $PY benchmarks/pretrain.py --scale gpu --jobs 7 --reuse ;;
  text)
    $PY benchmarks/text_step_cost.py --scale gpu --out "$out"
    $PY benchmarks/text_step_cost.py --scale gpu --task lm --batch 16 --out "$out"
    $PY benchmarks/text_step_cost.py --scale gpu --task vlm --out "$out"
    $PY benchmarks/distill_cost.py --scale gpu --out "$out"
    ;;
  text_accuracy) $PY benchmarks/text_accuracy.py --scale gpu --jobs 12 --wordnet "${MASKSUB_WORDNET:-/usr/share/wordnet}" ;;
  text_pretrain) $PY benchmarks/text_pretrain.py --scale gpu --jobs 15 --wordnet "${MASKSUB_WORDNET:-/usr/share/wordnet}" ;;
esac

# one copy of each result file in each place
for f in $files; do
  if [ -f "$out/$f" ] && [ ! "$out/$f" -ef "$RES/$f" ]; then cp "$out/$f" "$RES/"; fi
  if [ -n "$dest" ] && [ -f "$RES/$f" ] && [ ! "$RES/$f" -ef "$dest/$f" ]; then cp "$RES/$f" "$dest/"; fi
done
