{{/*
The rule groups. Every series carries job, stage and rank (dinoforge's own labels, kept by
honorLabels) and the target's instance; a series is present only while its target is scraped,
so "and on (instance) dinoforge_up_timestamp_seconds" means "while that process is up".
*/}}
{{- define "dinoforge-platform.ruleGroups" -}}
{{- $r := .Values.prometheusRules }}
{{- $training := printf "stage=~%q" $r.trainingStages }}
{{- if $r.recording }}
- name: dinoforge.recording
  rules:
    - record: job_stage:dinoforge_images:rate5m
      expr: sum by (namespace, job, stage) (rate(dinoforge_images_total[5m]))
    - record: job_stage:dinoforge_data_wait:ratio_rate5m
      expr: |-
        sum by (namespace, job, stage) (rate(dinoforge_data_wait_seconds_total[5m]))
          / sum by (namespace, job, stage) (rate(dinoforge_step_seconds_total[5m]))
{{- end }}
- name: dinoforge.alerts
  rules:
    {{- with $r.stalledThroughput }}
    {{- if .enabled }}
    - alert: DinoforgeThroughputStalled
      expr: |-
        rate(dinoforge_images_total{ {{- $training -}} }[{{ .window }}]) == 0
          and on (instance) dinoforge_up_timestamp_seconds
      for: {{ .for }}
      labels:
        severity: {{ .severity }}
      annotations:
        summary: "{{"{{"}} $labels.job {{"}}"}} {{"{{"}} $labels.stage {{"}}"}} rank {{"{{"}} $labels.rank {{"}}"}} trains no images"
        description: "The rank is scraped but its image counter has not grown for {{ .window }}, for {{ .for }}: a hung collective, data loader or storage read."
    {{- end }}
    {{- end }}
    {{- with $r.nanLoss }}
    {{- if .enabled }}
    - alert: DinoforgeLossNotFinite
      expr: dinoforge_loss != dinoforge_loss or abs(dinoforge_loss) == Inf
      for: {{ .for }}
      labels:
        severity: {{ .severity }}
      annotations:
        summary: "{{"{{"}} $labels.job {{"}}"}} {{"{{"}} $labels.stage {{"}}"}} rank {{"{{"}} $labels.rank {{"}}"}}: {{"{{"}} $labels.name {{"}}"}} is {{"{{"}} $value {{"}}"}}"
        description: "Training diverged: restart from the last checkpoint with a lower learning rate or fp32 heads."
    {{- end }}
    {{- end }}
    {{- with $r.restartLoop }}
    {{- if .enabled }}
    - alert: DinoforgeRestartLoop
      expr: |-
        max by (namespace, job, stage) (
          max_over_time(dinoforge_restarts[{{ .window }}]) - min_over_time(dinoforge_restarts[{{ .window }}])
        ) > {{ int .maxRestarts }}
      labels:
        severity: {{ .severity }}
      annotations:
        summary: "{{"{{"}} $labels.job {{"}}"}} {{"{{"}} $labels.stage {{"}}"}} restarted {{"{{"}} $value {{"}}"}} times in {{ .window }}"
        description: "torchelastic keeps restarting the worker group: look at the first failure in the pod logs."
    {{- end }}
    {{- end }}
    {{- with $r.gpuIdle }}
    {{- if .enabled }}
    - alert: DinoforgeGpuIdle
      expr: dinoforge_gpu_utilization_ratio{ {{- $training -}} } < {{ divf .belowPercent 100 }}
      for: {{ .for }}
      labels:
        severity: {{ .severity }}
      annotations:
        summary: "{{"{{"}} $labels.job {{"}}"}} {{"{{"}} $labels.stage {{"}}"}} rank {{"{{"}} $labels.rank {{"}}"}}: GPU {{"{{"}} $labels.gpu {{"}}"}} below {{ .belowPercent }}% busy"
        description: "The GPU has been below {{ .belowPercent }}% utilisation for {{ .for }} while a training stage runs: input-bound, stalled or waiting on other ranks."
    {{- end }}
    {{- end }}
{{- end }}
