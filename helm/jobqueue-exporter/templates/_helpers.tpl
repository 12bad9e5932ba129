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

{{/* Where the web config Secret and the TLS files are mounted (one projected volume, read-only). */}}
{{- define "jobqueue-exporter.webConfigDir" -}}/etc/jobqueue-exporter-web{{- end -}}

{{/*
The web configuration (--web.config.file), as a YAML mapping every template reads:
  enabled, secretName, key (the Secret and key holding the file), created (the chart creates that Secret),
  file (its content when created), tlsSecret, clientCASecret, clientCAKey (what the volume projects; absent
  when not used), https (every endpoint is HTTPS), clientCertRequired (RequireAndVerifyClientCert: no
  httpGet probe can connect), basicAuth (basic_auth_users is set in webConfig.config; false with
  existingSecret, whose content the chart cannot know).
Fails with a message naming the value to set when the values contradict each other.
*/}}
{{- define "jobqueue-exporter.web" -}}
{{- $w := .Values.webConfig -}}
{{- $tls := $w.tls -}}
{{- if and $w.config $w.existingSecret -}}
{{- fail "webConfig: set either webConfig.config (the chart creates the Secret) or webConfig.existingSecret (your own Secret with the whole file), not both" -}}
{{- end -}}
{{- if and $tls.enabled (not $tls.secretName) -}}
{{- fail "webConfig.tls.enabled: set webConfig.tls.secretName to a kubernetes.io/tls Secret (keys tls.crt and tls.key) in the release namespace, e.g. the one a cert-manager Certificate writes" -}}
{{- end -}}
{{- $clientCA := and $tls.enabled (or $tls.clientCASecret $tls.clientCAKey) -}}
{{- $config := deepCopy ($w.config | default dict) -}}
{{- $server := deepCopy (get $config "tls_server_config" | default dict) -}}
{{- range $user, $hash := (get $config "basic_auth_users" | default dict) -}}
{{- if not (regexMatch "^\\$2[aby]\\$[0-9]{2}\\$[./A-Za-z0-9]{53}$" (toString $hash)) -}}
{{- /* the value is never echoed: it may be a password written where its hash belongs */ -}}
{{- fail (printf "webConfig.config.basic_auth_users.%s: not a bcrypt hash (one looks like $2y$10$ followed by 53 characters; put the hash here, never the password): make one with python -c 'import bcrypt; print(bcrypt.hashpw(b\"PASSWORD\", bcrypt.gensalt()).decode())' or htpasswd -nBC 10 \"\" | tr -d ':\\n'" $user) -}}
{{- end -}}
{{- end -}}
{{- if $tls.enabled -}}
{{- /* relative paths resolve against the web config file's directory, where the volume projects the TLS files */ -}}
{{- if not (or (get $server "cert_file") (get $server "cert")) -}}
{{- $_ := set $server "cert_file" "tls/tls.crt" -}}
{{- end -}}
{{- if not (or (get $server "key_file") (get $server "key")) -}}
{{- $_ := set $server "key_file" "tls/tls.key" -}}
{{- end -}}
{{- if $clientCA -}}
{{- if not (or (get $server "client_ca_file") (get $server "client_ca")) -}}
{{- $_ := set $server "client_ca_file" "tls/client-ca.crt" -}}
{{- end -}}
{{- if not (get $server "client_auth_type") -}}
{{- $_ := set $server "client_auth_type" $tls.clientAuthType -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if $server -}}
{{- if not (or (get $server "cert_file") (get $server "cert")) -}}
{{- fail "webConfig.config.tls_server_config: no server certificate: set webConfig.tls.enabled and webConfig.tls.secretName (a kubernetes.io/tls Secret; the chart fills in cert_file and key_file), or remove tls_server_config to serve plain HTTP" -}}
{{- end -}}
{{- $_ := set $config "tls_server_config" $server -}}
{{- end -}}
{{- $web := dict "enabled" (or (not (empty $w.config)) (not (empty $w.existingSecret)) (not (empty $tls.enabled))) -}}
{{- $_ := set $web "created" (and $web.enabled (not $w.existingSecret)) -}}
{{- if $w.existingSecret -}}
{{- $_ := set $web "secretName" $w.existingSecret -}}
{{- $_ := set $web "key" $w.existingSecretKey -}}
{{- $_ := set $web "https" (not (empty $tls.enabled)) -}}
{{- $_ := set $web "clientCertRequired" (and $clientCA (eq $tls.clientAuthType "RequireAndVerifyClientCert")) -}}
{{- $_ := set $web "basicAuth" false -}}
{{- else -}}
{{- $_ := set $web "secretName" (printf "%s-web-config" (include "jobqueue-exporter.fullname" .)) -}}
{{- $_ := set $web "key" "web-config.yml" -}}
{{- $_ := set $web "https" (not (empty $server)) -}}
{{- $_ := set $web "clientCertRequired" (eq (get $server "client_auth_type" | default "NoClientCert") "RequireAndVerifyClientCert") -}}
{{- $_ := set $web "basicAuth" (not (empty (get $config "basic_auth_users"))) -}}
{{- $_ := set $web "file" (printf "# Rendered by the jobqueue-exporter Helm chart from its webConfig values.\n%s\n" (toYaml $config)) -}}
{{- end -}}
{{- if $tls.enabled -}}
{{- $_ := set $web "tlsSecret" $tls.secretName -}}
{{- if $clientCA -}}
{{- $_ := set $web "clientCASecret" ($tls.clientCASecret | default $tls.secretName) -}}
{{- $_ := set $web "clientCAKey" ($tls.clientCAKey | default "ca.crt") -}}
{{- end -}}
{{- end -}}
{{- $sm := .Values.serviceMonitor -}}
{{- if $sm.enabled -}}
{{- if and $web.basicAuth (not $sm.basicAuth.secretName) -}}
{{- fail "webConfig.config.basic_auth_users is set, so Prometheus must log in: set serviceMonitor.basicAuth.secretName to a Secret (in the ServiceMonitor's namespace) with the user name and the password under serviceMonitor.basicAuth.usernameKey / passwordKey" -}}
{{- end -}}
{{- if and $web.clientCertRequired (not $sm.tlsConfig.certSecretName) -}}
{{- fail "client certificates are required (RequireAndVerifyClientCert), so Prometheus must present one: set serviceMonitor.tlsConfig.certSecretName to a kubernetes.io/tls Secret (in the ServiceMonitor's namespace) issued by the client CA, or use webConfig.tls.clientAuthType: VerifyClientCertIfGiven" -}}
{{- end -}}
{{- if and $web.https (not $sm.tlsConfig.insecureSkipVerify) (not $sm.tlsConfig.caSecretName) -}}
{{- if not $tls.enabled -}}
{{- fail "webConfig.config.tls_server_config is set, so Prometheus scrapes over HTTPS: set serviceMonitor.tlsConfig.caSecretName (and caKey) to the CA that issued the exporter's certificate" -}}
{{- end -}}
{{- $smNamespace := $sm.namespace | default .Release.Namespace -}}
{{- if ne $smNamespace .Release.Namespace -}}
{{- fail (printf "serviceMonitor.namespace is %s, but prometheus-operator reads the CA Secret from the ServiceMonitor's namespace, not from the release's (%s, where webConfig.tls.secretName is): set serviceMonitor.tlsConfig.caSecretName to a Secret in %s holding the CA" $smNamespace .Release.Namespace $smNamespace) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toYaml $web -}}
{{- end -}}
