{{/* Names, labels and the pieces the worker Job and the test pod share. */}}

{{- define "dinov2-curation.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name, at most 52 characters: the API server rejects longer Indexed Job names, since a pod's
hostname <job>-<index> must stay within 63.
*/}}
{{- define "dinov2-curation.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "dinov2-curation.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dinov2-curation.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dinov2-curation.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "dinov2-curation.labels" -}}
helm.sh/chart: {{ include "dinov2-curation.chart" . }}
{{ include "dinov2-curation.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dinoforge
{{- end }}

{{- define "dinov2-curation.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dinov2-curation.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "dinov2-curation.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* One word for sh: single-quoted, embedded single quotes closed, escaped and reopened. */}}
{{- define "dinov2-curation.sh" -}}
'{{ replace "'" "'\\''" (toString .) }}'
{{- end }}

{{/* A curation URI's subfolder, as dinoforge's storage.join builds it. */}}
{{- define "dinov2-curation.join" -}}
{{- printf "%s/%s" (trimSuffix "/" (index . 0)) (index . 1) }}
{{- end }}

{{/*
The manifests every shard embeds, as a YAML list of {name, manifest, out}: the pool into OUT,
the evaluation set into OUT/eval and the seeds into OUT/seeds, where `dinoforge curate run`
looks for them.
*/}}
{{- define "dinov2-curation.embedSets" -}}
{{- $c := .Values.curation }}
- {name: pool, manifest: {{ $c.pool | quote }}, out: {{ $c.out | quote }}}
{{- if $c.evalManifest }}
- {name: eval, manifest: {{ $c.evalManifest | quote }}, out: {{ include "dinov2-curation.join" (list $c.out "eval") | quote }}}
{{- end }}
{{- if $c.seeds }}
- {name: seeds, manifest: {{ $c.seeds | quote }}, out: {{ include "dinov2-curation.join" (list $c.out "seeds") | quote }}}
{{- end }}
{{- end }}

{{/* dinoforge's global flags. */}}
{{- define "dinov2-curation.dinoforge" -}}
dinoforge{{ if .Values.curation.verbose }} -v{{ end }}
{{- end }}

{{/* Flags `curate embed` and `curate run` share; equal values keep a chunk's bytes the same whoever computes it. */}}
{{- define "dinov2-curation.embedFlags" -}}
{{- $c := .Values.curation -}}
--weights {{ include "dinov2-curation.sh" $c.weights }} --chunk-rows {{ int $c.chunkRows }} --batch-size {{ int $c.batchSize }}
{{- if $c.device }} --device {{ include "dinov2-curation.sh" $c.device }}{{ end }}
{{- end }}

{{/*
The worker script (sh -c). Every pod embeds its shard of each set; pod 0 then waits until all
chunks are on object storage (or until no new chunk appeared for waitStallSeconds) and runs
`dinoforge curate run`, which skips the complete chunks, embeds any missing one itself, and runs
dedup, clustering, sampling/retrieval and the report. User values reach sh single-quoted.
*/}}
{{- define "dinov2-curation.workerScript" -}}
{{- $c := .Values.curation -}}
{{- $sets := include "dinov2-curation.embedSets" . | fromYamlArray -}}
set -eu
rank="${JOB_COMPLETION_INDEX:?set by the Indexed Job}"
echo "dinov2-curation: shard $rank of {{ int .Values.shards }}"
{{- range $sets }}
{{ include "dinov2-curation.dinoforge" $ }} curate embed {{ include "dinov2-curation.sh" .manifest }} --out {{ include "dinov2-curation.sh" .out }} --rank "$rank" --world {{ int $.Values.shards }} {{ include "dinov2-curation.embedFlags" $ }}
{{- end }}
if [ "$rank" != 0 ]; then exit 0; fi
python3 /opt/dinov2-curation/wait_for_embeddings.py --world {{ int .Values.shards }} --poll-seconds {{ int $c.waitPollSeconds }} --stall-seconds {{ int $c.waitStallSeconds }}
{{- range $sets }} {{ include "dinov2-curation.sh" .out }}{{ end }}
exec {{ include "dinov2-curation.dinoforge" . }} curate run {{ include "dinov2-curation.sh" $c.pool }} --out {{ include "dinov2-curation.sh" $c.out }} {{ include "dinov2-curation.embedFlags" . }}
{{- if gt (int $c.sampleSize) 0 }} --n {{ int $c.sampleSize }}{{ end }} --dedup {{ $c.dedupMethod }}
{{- if $c.evalManifest }} --eval-manifest {{ include "dinov2-curation.sh" $c.evalManifest }}{{ end }}
{{- if $c.seeds }} --seeds {{ include "dinov2-curation.sh" $c.seeds }} --retrieve {{ $c.retrieveMethod }} --k {{ int $c.k }} --per-cluster {{ int $c.perCluster }}{{ end }}
{{- if $c.levels }} --levels{{ range $c.levels }} {{ int . }}{{ end }}{{ end }} --resampling-steps {{ int $c.resamplingSteps }} --seed {{ int $c.seed }}
{{- end }}

{{/* Environment of every container (workers and test): identity, metrics, MLflow, storage, writable scratch. */}}
{{- define "dinov2-curation.env" -}}
- name: DINOFORGE_JOB
  value: {{ include "dinov2-curation.fullname" . | quote }}
- name: DINOFORGE_STAGE
  value: curate
- name: DINOFORGE_IMAGE
  value: {{ include "dinov2-curation.image" . | quote }}
- name: MLFLOW_EXPERIMENT_NAME
  value: {{ .Values.mlflow.experiment | quote }}
{{- with .Values.mlflow.trackingUri }}
- name: MLFLOW_TRACKING_URI
  value: {{ . | quote }}
{{- end }}
{{- with .Values.mlflow.lineageParent }}
- name: DINOFORGE_LINEAGE_PARENT
  value: {{ . | quote }}
{{- end }}
{{- with .Values.objectStore.endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
# The root filesystem is read-only: home, caches and matplotlib's config go to the emptyDirs.
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /cache
- name: MPLCONFIGDIR
  value: /cache/matplotlib
- name: TORCH_HOME
  value: /cache/torch
- name: PYTHONUNBUFFERED
  value: "1"
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "dinov2-curation.envFrom" -}}
{{- if .Values.objectStore.secretAsEnv }}
{{- with .Values.objectStore.secretName }}
- secretRef:
    name: {{ . | quote }}
{{- end }}
{{- end }}
{{- with .Values.mlflow.secretName }}
- secretRef:
    name: {{ . | quote }}
{{- end }}
{{- end }}

{{- define "dinov2-curation.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /cache
- name: scripts
  mountPath: /opt/dinov2-curation
  readOnly: true
{{- if and .Values.objectStore.secretName .Values.objectStore.mountPath }}
- name: object-store-secret
  mountPath: {{ .Values.objectStore.mountPath | quote }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "dinov2-curation.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.scratch.tmpSizeLimit | quote }}
- name: cache
  emptyDir:
    sizeLimit: {{ .Values.scratch.cacheSizeLimit | quote }}
- name: scripts
  configMap:
    name: {{ include "dinov2-curation.fullname" . }}-scripts
    defaultMode: 0444
{{- if and .Values.objectStore.secretName .Values.objectStore.mountPath }}
- name: object-store-secret
  secret:
    secretName: {{ .Values.objectStore.secretName | quote }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{/* Pod-level scheduling and security shared by workers and the test pod. */}}
{{- define "dinov2-curation.podCommon" -}}
serviceAccountName: {{ include "dinov2-curation.serviceAccountName" . }}
# The pods never call the Kubernetes API: no token in them.
automountServiceAccountToken: false
enableServiceLinks: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Checks that depend on the target cluster, which values.schema.json cannot see. */}}
{{- define "dinov2-curation.validate" -}}
{{- if and (not (kindIs "invalid" .Values.job.backoffLimitPerIndex)) (not (semverCompare ">=1.29.0-0" .Capabilities.KubeVersion.Version)) }}
{{- fail (printf "job.backoffLimitPerIndex needs Kubernetes 1.29 or newer (target: %s): leave it null there" .Capabilities.KubeVersion.Version) }}
{{- end }}
{{- end }}
