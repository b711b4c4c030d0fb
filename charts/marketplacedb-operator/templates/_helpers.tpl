{{/*
Names and labels shared by every template. Keep to the template functions tests/chart_render.py
implements (the tests render this chart in Python: Helm cannot run where they do).
*/}}

{{- define "marketplacedb-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: the release name alone when it already contains the chart's. */}}
{{- define "marketplacedb-operator.fullname" -}}
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

{{- define "marketplacedb-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "marketplacedb-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "marketplacedb-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | trunc 63 | trimSuffix "-" }}
{{ include "marketplacedb-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: marketplacedb
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "marketplacedb-operator.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "marketplacedb-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "marketplacedb-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The webhook's serving certificate: cert-manager's Secret, or the one given. */}}
{{- define "marketplacedb-operator.webhookSecret" -}}
{{- if .Values.webhook.secretName -}}
{{ .Values.webhook.secretName }}
{{- else -}}
{{ include "marketplacedb-operator.fullname" . }}-webhook-tls
{{- end -}}
{{- end -}}
