#!/usr/bin/env bash
# End to end on a folder of JPEGs: decode, encode, one point each, masks as COCO RLE, through
# `segany segment --prompts` (8 images a call). Usage: scripts/e2e_prompts.sh SEGANY CHECKPOINT
# IMAGE_DIR COPIES OUT [--device cuda]. The images of IMAGE_DIR are listed COPIES times.
set -euo pipefail
segany=$1 ckpt=$2 images=$3 copies=$4 out=$5
shift 5
mkdir -p "$out"
python3 - "$images" "$copies" > "$out/prompts.json" <<'PY'
import json, os, sys
folder, copies = sys.argv[1], int(sys.argv[2])
files = sorted(f for f in os.listdir(folder) if f.lower().endswith((".jpg", ".jpeg")))
entries = [{"file": os.path.join(os.path.abspath(folder), f), "prompts": [{"points": [[200, 150, 1]]}]}
           for _ in range(copies) for f in files]
print(json.dumps({"images": entries}))
PY
"$segany" segment "$ckpt" --prompts "$out/prompts.json" --out "$out" "$@" | tail -2
