#!/usr/bin/env bash
# From a fresh clone to masks in one command: installs the dependencies, builds segany, fetches the
# official vit_b checkpoint (or, offline, makes a random-weight model and says so loudly), and
# segments an image from one click.
#   usage: scripts/quickstart.sh [IMAGE] [X,Y]
#     IMAGE  a JPEG or PNG (default: a photo of a cat, from Debian's scikit-image package)
#     X,Y    the click, in pixels of the image (default: the image's centre)
#   env: SEGANY_CACHE (checkpoints and the sample image; default ~/.cache/segany),
#        SEGANY_BUILD_DIR (default build), SEGANY_DEVICE (cpu or cuda; default cpu)
set -euo pipefail
cd "$(dirname "$0")/.."

image=${1:-}
point=${2:-}
cache=${SEGANY_CACHE:-$HOME/.cache/segany}
build=${SEGANY_BUILD_DIR:-build}
device=${SEGANY_DEVICE:-cpu}
out=out/quickstart

say() { printf '\n==> %s\n' "$*"; }
die() { printf 'quickstart.sh: %s\n' "$*" >&2; exit 1; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else return 1; fi; }

# Width and height of a PNG or baseline/progressive JPEG, from its header ("W H"), for the default
# click. The stored size: a photo turned by its EXIF orientation may need an explicit X,Y.
image_size() {
  head -c 262144 "$1" | od -An -v -tu1 -w1 | awk '
    { b[NR - 1] = $1 }
    END {
      if (b[0] == 137 && b[1] == 80) {  # PNG: IHDR width and height, big-endian, at bytes 16 and 20
        print b[16] * 16777216 + b[17] * 65536 + b[18] * 256 + b[19], b[20] * 16777216 + b[21] * 65536 + b[22] * 256 + b[23]
        exit 0
      }
      if (b[0] != 255 || b[1] != 216) exit 1
      for (i = 2; i + 8 < NR;) {         # JPEG: walk the segments to the first start-of-frame
        if (b[i] != 255) exit 1
        m = b[i + 1]
        if (m == 255) { i++; continue }
        if (m >= 192 && m <= 207 && m != 196 && m != 200 && m != 204) {
          print b[i + 7] * 256 + b[i + 8], b[i + 5] * 256 + b[i + 6]
          exit 0
        }
        i += 2 + b[i + 2] * 256 + b[i + 3]
      }
      exit 1
    }'
}

say "dependencies (scripts/setup.sh)"
scripts/setup.sh

# The CUDA backend is built where nvcc is, as scripts/test.sh does, so that both share $build/.
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH=/usr/local/cuda/bin:$PATH; fi
if command -v nvcc >/dev/null 2>&1; then cuda=ON; else cuda=OFF; fi
say "building segany in $build/ (Release, CUDA backend $cuda)"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSEGANY_CUDA=$cuda >/dev/null
cmake --build "$build" -j"$(nproc)" --target segany_cli
segany=$build/apps/segany

mkdir -p "$cache"
official=$cache/sam_vit_b_01ec64.pth
url=https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth
random_model=false
if [ -s "$official" ]; then
  checkpoint=$official
else
  # A quick probe first, so that being offline costs one line rather than curl's messages.
  if curl --fail --silent --head --location --connect-timeout 10 "$url" >/dev/null 2>&1; then
    say "downloading the official vit_b checkpoint (375 MB) to $cache/"
    curl --fail --location --connect-timeout 10 --progress-bar -o "$official.part" "$url" ||
      { rm -f "$official.part"; die "the download of $url failed; run again to retry"; }
    mv "$official.part" "$official"
    checkpoint=$official
  else
    echo "cannot download the official vit_b checkpoint (no network?): using a random-weight model instead"
    checkpoint=$cache/random_vit_b.safetensors
    random_model=true
    [ -s "$checkpoint" ] || "$segany" init --arch vit_b "$checkpoint"
  fi
fi
"$segany" info "$checkpoint"

if [ -z "$image" ]; then
  image=$cache/chelsea.png
  if [ ! -s "$image" ]; then
    say "fetching a sample image: chelsea.png from Debian's python3-skimage package (downloaded, not installed)"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    # apt-get download needs the package lists; a fresh container may have none yet.
    fetch() { (cd "$tmp" && apt-get download python3-skimage) >"$tmp/apt.log" 2>&1; }
    if fetch || { as_root apt-get update -qq >/dev/null 2>&1 && fetch; }; then
      dpkg-deb -x "$tmp"/python3-skimage_*.deb "$tmp/pkg"
      cp "$tmp/pkg/usr/lib/python3/dist-packages/skimage/data/chelsea.png" "$image"
    else
      cat "$tmp/apt.log" >&2
      die "no sample image (apt-get download python3-skimage failed): pass one: scripts/quickstart.sh IMAGE [X,Y]"
    fi
  fi
  [ -n "$point" ] || point=225,150  # on the cat
fi
if [ -z "$point" ]; then
  size=$(image_size "$image") || die "cannot read the size of $image to click its centre: pass X,Y after the image"
  point="$(( ${size% *} / 2 )),$(( ${size#* } / 2 ))"
fi

say "segany segment $checkpoint $image --point $point --multimask --out $out"
"$segany" segment "$checkpoint" "$image" --point "$point" --multimask --out "$out" --device "$device"

say "done: $out/overlay.png shows the masks; $out/result.json has their scores, areas and boxes"
if $random_model; then
  cat <<'BANNER'

  !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
  !!!  These masks come from a model with RANDOM weights: they are MEANINGLESS.               !!!
  !!!  The pipeline ran end to end; for real masks, put sam_vit_b_01ec64.pth (from            !!!
  !!!  https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth) in the cache     !!!
  !!!  folder (SEGANY_CACHE, default ~/.cache/segany) and run this again.                     !!!
  !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
BANNER
fi
