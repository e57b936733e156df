#!/bin/bash
# copy this worktree's committed tree + .devrun scripts to where the device run tool picks it up
set -e
D=/work/main/.devrun-t24
rm -rf $D && mkdir -p $D/tree
git -C /work/t24 archive HEAD | tar -x -C $D/tree
cp -r /work/t24/.devrun $D/tree/.devrun
# uncommitted changes of tracked files too
cd /work/t24 && git diff --name-only | while read f; do cp "$f" "$D/tree/$f"; done
git ls-files --others --exclude-standard | while read f; do mkdir -p "$D/tree/$(dirname $f)"; cp "$f" "$D/tree/$f"; done
du -sh $D
