{{- define "meshgate.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "meshgate.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "meshgate.instanceLabels" -}}
app.kubernetes.io/name: {{ include "meshgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "meshgate.selectorLabels" -}}
{{ include "meshgate.instanceLabels" . }}
app.kubernetes.io/component: gateway
{{- end -}}

{{- define "meshgate.labels" -}}
{{ include "meshgate.instanceLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* proxy.yaml: the values' config, with the bundled Redis as state when asked for */}}
{{- define "meshgate.config" -}}
{{- $config := deepCopy .Values.config -}}
{{- if .Values.redis.bundled -}}
{{- $_ := set $config "state" (dict "backend" "redis" "url" (printf "redis://%s-redis:6379/0" (include "meshgate.fullname" .))) -}}
{{- else if .Values.redis.url -}}
{{- $_ := set $config "state" (dict "backend" "redis" "url" .Values.redis.url) -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}
