{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "durablecache.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects. */}}
{{- define "durablecache.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "durablecache.selectorLabels" -}}
app.kubernetes.io/name: {{ include "durablecache.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "durablecache.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "durablecache.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: durablecache
{{- end }}

{{- define "durablecache.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "durablecache.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "durablecache.peeringName" -}}
{{- default (include "durablecache.fullname" .) .Values.peering.name }}
{{- end }}

{{/* Image reference; the tag defaults to the chart's appVersion. */}}
{{- define "durablecache.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The worker pods' ClusterRole, bound per migration by the operator (templates/rbac.yaml). */}}
{{- define "durablecache.workerClusterRole" -}}
{{- printf "%s-worker" (include "durablecache.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}
