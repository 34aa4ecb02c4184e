{{/* Names and labels. */}}

{{- define "dinoforge-platform.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name, at most 56 characters: the longest suffix added to it is "-mlflow". */}}
{{- define "dinoforge-platform.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 56 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 56 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 56 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "dinoforge-platform.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dinoforge-platform.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "dinoforge-platform.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "dinoforge-platform.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dinoforge
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "dinoforge-platform.mlflowName" -}}
{{ include "dinoforge-platform.fullname" . }}-mlflow
{{- end }}

{{/* The tracking URI jobs use: the chart's own Service, else the configured server. */}}
{{- define "dinoforge-platform.trackingUri" -}}
{{- if .Values.mlflow.deploy }}
{{- printf "http://%s.%s.svc:%d" (include "dinoforge-platform.mlflowName" .) .Release.Namespace (int .Values.mlflow.service.port) }}
{{- else }}
{{- .Values.mlflow.trackingUri }}
{{- end }}
{{- end }}

{{/*
`mlflow server` arguments. --allowed-hosts replaces MLflow's default (localhost and private
IPs; /health answers any host): jobs call the Service by name, so its names are always in it. $(MLFLOW_BACKEND_STORE_URI) is expanded by the kubelet from the
container's env (a Secret key), so the database password never appears in the pod spec.
*/}}
{{- define "dinoforge-platform.mlflowArgs" -}}
{{- $m := .Values.mlflow }}
- server
- --host=0.0.0.0
- --port={{ int $m.service.port }}
- --workers={{ int $m.workers }}
{{- if $m.auth.enabled }}
- --app-name=basic-auth
{{- end }}
{{- if eq $m.backendStore.type "sqlite" }}
- --backend-store-uri=sqlite:////data/mlflow.db
{{- else }}
- --backend-store-uri=$(MLFLOW_BACKEND_STORE_URI)
{{- end }}
{{- $destination := default "/data/artifacts" $m.artifacts.destination }}
{{- if $m.artifacts.serve }}
- --serve-artifacts
- --artifacts-destination={{ $destination }}
{{- else }}
- --no-serve-artifacts
- --default-artifact-root={{ $destination }}
{{- end }}
{{- $name := include "dinoforge-platform.mlflowName" . }}
{{- $hosts := list }}
{{- range list "" (printf ".%s" .Release.Namespace) (printf ".%s.svc" .Release.Namespace) (printf ".%s.svc.cluster.local" .Release.Namespace) }}
{{- $hosts = append $hosts (printf "%s%s:*" $name .) }}
{{- end }}
- --allowed-hosts={{ concat $hosts $m.allowedHosts | join "," }}
{{- with $m.extraArgs }}
{{ toYaml . }}
{{- end }}
{{- end }}
