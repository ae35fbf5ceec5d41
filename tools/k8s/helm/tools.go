//go:build tools

// Package tools records helm's main package so `go mod tidy` keeps its
// dependencies in go.mod/go.sum; scripts/build-k8s-tools.sh builds it.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
