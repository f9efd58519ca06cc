{{- define "moe-watch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "moe-watch.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "moe-watch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moe-watch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "moe-watch.labels" -}}
{{ include "moe-watch.selectorLabels" . }}
app.kubernetes.io/part-of: moe-watch
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "moe-watch.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "moe-watch.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "moe-watch.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "moe-watch.scheme" -}}
{{- if .Values.webConfig.tls -}}https{{- else -}}http{{- end -}}
{{- end -}}

{{/* The agent's config file: the `config` values, with `listen` from `port`. */}}
{{- define "moe-watch.config" -}}
{{- $config := merge (dict "listen" (printf "0.0.0.0:%v" .Values.port)) (omit .Values.config "listen") -}}
{{ toYaml $config }}
{{- end -}}
