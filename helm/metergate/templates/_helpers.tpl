{{/* Chart name, truncated to a DNS label. */}}
{{- define "metergate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name shared by every object of a release. */}}
{{- define "metergate.fullname" -}}
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

{{- define "metergate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "metergate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "metergate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "metergate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "metergate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "metergate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "metergate.ratecardsConfigMap" -}}
{{- default (printf "%s-ratecards" (include "metergate.fullname" .)) .Values.ratecards.existingConfigMap }}
{{- end }}

{{/*
metergate.yaml as the pod reads it: the user's config with what the chart
decides (listen address, port, where the cards are) laid over it.
*/}}
{{- define "metergate.configYaml" -}}
{{- $fixed := dict "host" "0.0.0.0" "port" (int .Values.containerPort) "ratecards_dir" "ratecards" }}
{{- toYaml (merge $fixed (deepCopy (default (dict) .Values.config))) }}
{{- end }}

{{/*
One env entry read from a Secret. Call with
(dict "env" NAME "ref" REF "root" $): REF is {key, name, optional}.
*/}}
{{- define "metergate.secretEnv" -}}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ default (default (include "metergate.fullname" .root) .root.Values.secrets.name) .ref.name | quote }}
      key: {{ required (printf "secrets: a key for %s" .env) .ref.key | quote }}
      {{- if .ref.optional }}
      optional: true
      {{- end }}
{{- end }}
