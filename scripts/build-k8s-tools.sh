#!/usr/bin/env bash
# Build the real Kubernetes parts the tests run against -- kube-apiserver, etcd,
# kubectl and helm -- from the Go modules pinned in tools/k8s (go.mod, go.sum)
# and tools/k8s/helm, with this machine's Go and module proxy.
#
# Cached and idempotent: binaries go to a directory OUTSIDE the repository,
# keyed by the pinned versions and a hash of the module files, so a version bump
# builds into a fresh directory and an unchanged checkout builds nothing.
#
#   bash scripts/build-k8s-tools.sh              # build what is missing, print the dir
#   bash scripts/build-k8s-tools.sh --print-dir  # only print the dir (no build)
#
# Environment:
#   DURABLECACHE_TOOLS  use this directory instead of the default
#                       $HOME/.cache/durablecache/tools/<version>
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mods="$repo/tools/k8s"

# Versions come from the pinned go.mod files, the one place they are written.
mod_version() { # <go.mod> <module path>
    awk -v m="$2" '$1 == "require" { $1 = ""; $0 = $0 }
                   $1 == m && $2 ~ /^v/ { print $2; exit }' "$1"
}
k8s_version="$(mod_version "$mods/go.mod" k8s.io/kubernetes)"
etcd_version="$(mod_version "$mods/go.mod" go.etcd.io/etcd/server/v3)"
helm_version="$(mod_version "$mods/helm/go.mod" helm.sh/helm/v3)"
if [[ -z "$k8s_version" || -z "$etcd_version" || -z "$helm_version" ]]; then
    echo "build-k8s-tools: cannot read pinned versions from $mods/go.mod and $mods/helm/go.mod" >&2
    exit 1
fi

k8s_minor="${k8s_version#v1.}"; k8s_minor="${k8s_minor%%.*}"
helm_k8s_minor="$(mod_version "$mods/helm/go.sum" k8s.io/client-go | cut -d. -f2)"

export GOTOOLCHAIN=local          # never download another Go toolchain
export GOFLAGS="${GOFLAGS:-} -mod=readonly -buildvcs=false"
export CGO_ENABLED=0              # static binaries, no C toolchain needed

# Version stamps the upstream Makefiles set with -X; kube-apiserver uses them for
# its binary/emulation version, kubectl and helm print them.
k8s_ldflags="-s -w \
 -X k8s.io/component-base/version.gitVersion=${k8s_version} \
 -X k8s.io/component-base/version.gitMajor=1 \
 -X k8s.io/component-base/version.gitMinor=${k8s_minor} \
 -X k8s.io/component-base/version.gitTreeState=clean \
 -X k8s.io/client-go/pkg/version.gitVersion=${k8s_version} \
 -X k8s.io/client-go/pkg/version.gitMajor=1 \
 -X k8s.io/client-go/pkg/version.gitMinor=${k8s_minor}"
helm_ldflags="-s -w \
 -X helm.sh/helm/v3/internal/version.version=${helm_version} \
 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 \
 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=${helm_k8s_minor} \
 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 \
 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=${helm_k8s_minor}"

go_build_flags="-trimpath"

# The hash covers the module files and the build recipe (flags, environment),
# so changing either lands in a new cache directory instead of reusing stale
# binaries; editing the rest of this script (messages, timing) does not.
digest="$( { cat "$mods/go.mod" "$mods/go.sum" "$mods/helm/go.mod" "$mods/helm/go.sum"
             printf '%s\n' "$GOTOOLCHAIN" "$GOFLAGS" "$CGO_ENABLED" "$go_build_flags" \
                 "$k8s_ldflags" "$helm_ldflags"; } | sha256sum | cut -c1-12)"
version="k8s-${k8s_version}_etcd-${etcd_version}_helm-${helm_version}_${digest}"
tools="${DURABLECACHE_TOOLS:-${HOME}/.cache/durablecache/tools/${version}}"

if [[ "${1:-}" == "--print-dir" ]]; then
    echo "$tools"
    exit 0
fi

mkdir -p "$tools"
# Several developers share this machine: one build at a time per cache dir.
exec 9>"$tools/.lock"
lock_start=$SECONDS
flock 9

# Seconds as "1m 05s": each step prints how long it took, so CI's log shows where the time went.
took() { # <start, in $SECONDS>
    local s=$((SECONDS - $1))
    printf '%dm %02ds' $((s / 60)) $((s % 60))
}
all_start=$SECONDS
if (( SECONDS - lock_start > 0 )); then
    echo "build-k8s-tools: waited $(took "$lock_start") for another build of $tools"
fi

# build <module dir> <binary name> <package> <ldflags>
# Builds into a temporary name and renames, so an interrupted build never
# leaves a half-written binary that a later run would take as done.
build() {
    local dir="$1" name="$2" pkg="$3" ldflags="$4"
    if [[ -x "$tools/$name" ]]; then
        echo "build-k8s-tools: $name already built"
        return 0
    fi
    echo "build-k8s-tools: building $name ($pkg)"
    local start=$SECONDS
    (cd "$dir" && go build $go_build_flags -ldflags="$ldflags" -o "$tools/.$name.tmp" "$pkg")
    mv -f "$tools/.$name.tmp" "$tools/$name"
    echo "build-k8s-tools: built $name in $(took "$start")"
}

build "$mods" etcd go.etcd.io/etcd/server/v3 "-s -w"
build "$mods" kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$k8s_ldflags"
build "$mods" kubectl k8s.io/kubernetes/cmd/kubectl "$k8s_ldflags"
build "$mods/helm" helm helm.sh/helm/v3/cmd/helm "$helm_ldflags"

echo "build-k8s-tools: all tools ready in $(took "$all_start") (a busy machine takes longer)"
echo "build-k8s-tools: tools in $tools"
echo "$tools"
