#!/usr/bin/env bash
# A tour of the kvzip-rag CLI on the sample documents, in a temporary store that is removed at the end.
#
#   bash examples/cli_walkthrough.sh
#
# Every command also takes --store DIR (or KVZIP_RAG_STORE), --model, --ratio, --level and --device.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/kvzip-walkthrough.XXXXXX")"
trap 'rm -rf "$work"' EXIT
export KVZIP_RAG_STORE="$work/store"          # where index.sqlite and the cache blobs go
kvzip_rag="${KVZIP_RAG_CLI:-kvzip-rag}"         # e.g. KVZIP_RAG_CLI="python -m kvzip_rag.cli"

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

step kvzip-rag index examples/docs/            # prefill, score, keep 30% of the KV pairs, store
$kvzip_rag index "$here/docs"

step kvzip-rag ls                              # documents, tokens, bytes kept vs the full cache
$kvzip_rag ls

step kvzip-rag ask "How much water does the tank of the Corvo S2 hold?"
$kvzip_rag ask "How much water does the tank of the Corvo S2 hold?" --max-tokens 48

step kvzip-rag ask "Who founded the town of Wrenfield?" --ratio 0.15   # load fewer KV pairs than stored
$kvzip_rag ask "Who founded the town of Wrenfield?" --ratio 0.15 --max-tokens 48

step 'printf "...\n...\n" | kvzip-rag chat'    # a conversation; the footer names the documents used
printf 'How long is the warranty of the Corvo S2?\nDoes it cover damage caused by limescale?\nexit\n' \
    | $kvzip_rag chat --max-tokens 40

step kvzip-rag inspect town_history.md --out "$work/pictures"
$kvzip_rag inspect town_history.md --out "$work/pictures"
ls -l "$work/pictures"

step kvzip-rag rm recipes.txt
$kvzip_rag rm recipes.txt
$kvzip_rag ls

step kvzip-rag rm no-such-document            # errors are one red line and a non-zero exit code
if $kvzip_rag rm no-such-document; then exit 1; else echo "(exit code $?)"; fi
