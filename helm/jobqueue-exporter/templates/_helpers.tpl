{{/* Names */}}
{{- define "jobqueue-exporter.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "jobqueue-exporter.fullname" -}}
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

{{- define "jobqueue-exporter.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "jobqueue-exporter.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "jobqueue-exporter.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Labels */}}
{{- define "jobqueue-exporter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "jobqueue-exporter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "jobqueue-exporter.labels" -}}
helm.sh/chart: {{ include "jobqueue-exporter.chart" . }}
{{ include "jobqueue-exporter.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: jobqueue-exporter
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "jobqueue-exporter.image" -}}
{{- $repository := .Values.image.repository -}}
{{- if .Values.image.registry -}}
{{- $repository = printf "%s/%s" .Values.image.registry .Values.image.repository -}}
{{- end -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" $repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repository (default .Chart.AppVersion .Values.image.tag | toString) -}}
{{- end -}}
{{- end -}}

{{/* Where the config file is mounted; the container args point at it. */}}
{{- define "jobqueue-exporter.configDir" -}}/etc/jobqueue-exporter{{- end -}}

{{- define "jobqueue-exporter.secretName" -}}
{{- default (include "jobqueue-exporter.fullname" .) .Values.existingSecret -}}
{{- end -}}

{{/*
DSN wiring, one entry per target (in config order), as a YAML list:
  name, env (variable holding the DSN), key (Secret key), recoveryEnv / recoveryKey (when the target has a
  recovery DSN). Fails with a message naming the value to set when a DSN source is missing or ambiguous.
*/}}
{{- define "jobqueue-exporter.dsnWiring" -}}
{{- $targets := .Values.config.targets | default list -}}
{{- if not $targets -}}
{{- fail "config.targets is empty: add at least one target, e.g. --set config.targets[0].name=app --set config.targets[0].preset=procrastinate (and its DSN in existingSecret or dsns.app)" -}}
{{- end -}}
{{- $existing := .Values.existingSecret -}}
{{- if and $existing (or .Values.dsns .Values.recoveryDsns) -}}
{{- fail "set either existingSecret (your own Secret) or dsns/recoveryDsns (the chart creates the Secret), not both" -}}
{{- end -}}
{{- if and (not $existing) (or .Values.existingSecretKeys .Values.existingSecretRecoveryKeys) -}}
{{- fail "existingSecretKeys / existingSecretRecoveryKeys name keys of existingSecret: set existingSecret too" -}}
{{- end -}}
{{- $names := list -}}
{{- range $targets -}}
{{- $names = append $names (toString .name) -}}
{{- end -}}
{{- range $map := list "dsns" "recoveryDsns" "existingSecretKeys" "existingSecretRecoveryKeys" -}}
{{- range $name, $_ := (index $.Values $map) -}}
{{- if not (has $name $names) -}}
{{- fail (printf "%s.%s: there is no target named %q in config.targets (targets: %s)" $map $name $name (join ", " $names)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $wiring := list -}}
{{- range $i, $target := $targets -}}
{{- $name := toString $target.name -}}
{{- $entry := dict "name" $name "env" (printf "JOBQUEUE_TARGET_%d_DSN" $i) -}}
{{- if $existing -}}
{{- $_ := set $entry "key" (get $.Values.existingSecretKeys $name | default $name) -}}
{{- if hasKey $.Values.existingSecretRecoveryKeys $name -}}
{{- $_ := set $entry "recoveryKey" (get $.Values.existingSecretRecoveryKeys $name) -}}
{{- end -}}
{{- else -}}
{{- if not (get $.Values.dsns $name) -}}
{{- fail (printf "no DSN for target %q: set existingSecret (a Secret with a key %q holding the DSN) or dsns.%s" $name $name $name) -}}
{{- end -}}
{{- $_ := set $entry "key" $name -}}
{{- if get $.Values.recoveryDsns $name -}}
{{- $_ := set $entry "recoveryKey" (printf "%s.recovery" $name) -}}
{{- end -}}
{{- end -}}
{{- if hasKey $entry "recoveryKey" -}}
{{- $_ := set $entry "recoveryEnv" (printf "JOBQUEUE_TARGET_%d_RECOVERY_DSN" $i) -}}
{{- end -}}
{{- $wiring = append $wiring $entry -}}
{{- end -}}
{{- toYaml $wiring -}}
{{- end -}}

{{/* The exporter's config file: config from values plus a ${ENV} reference per DSN. */}}
{{- define "jobqueue-exporter.configFile" -}}
{{- $wiring := include "jobqueue-exporter.dsnWiring" . | fromYamlArray -}}
{{- $targets := list -}}
{{- range $i, $target := .Values.config.targets -}}
{{- $w := index $wiring $i -}}
{{- $t := deepCopy $target -}}
{{- $_ := set $t "dsn" (printf "${%s}" $w.env) -}}
{{- if $w.recoveryEnv -}}
{{- $recovery := deepCopy ($t.recovery | default dict) -}}
{{- $_ := set $recovery "dsn" (printf "${%s}" $w.recoveryEnv) -}}
{{- $_ := set $t "recovery" $recovery -}}
{{- end -}}
{{- $targets = append $targets $t -}}
{{- end -}}
{{- $config := deepCopy (omit .Values.config "targets") -}}
{{- $_ := set $config "targets" $targets -}}
# Rendered by the jobqueue-exporter Helm chart from its `config` values. DSNs are ${ENV} references to
# variables the pod gets from a Secret.
{{ toYaml $config }}
{{- end -}}
