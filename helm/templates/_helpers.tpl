{{/* Chart name, truncated to the 63 characters a DNS label allows. */}}
{{- define "skyroute.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: <release>-skyroute unless the release already says it. */}}
{{- define "skyroute.fullname" -}}
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

{{- define "skyroute.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "skyroute.selectorLabels" -}}
app.kubernetes.io/name: {{ include "skyroute.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "skyroute.labels" -}}
helm.sh/chart: {{ include "skyroute.chart" . }}
{{ include "skyroute.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: skyroute
{{- with .Values.region }}
skyroute.io/region: {{ . | quote }}
{{- end }}
{{- end }}

{{- define "skyroute.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "skyroute.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "skyroute.headlessName" -}}
{{- printf "%s-peers" (include "skyroute.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "skyroute.configMapName" -}}
{{- printf "%s-routing" (include "skyroute.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "skyroute.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
The routing YAML: chart-managed defaults (listen address, instance id from the pod
name, admin key and sync token from the environment, peer discovery through the
headless Service) overlaid with .Values.routing, which wins key by key.
*/}}
{{- define "skyroute.routing" -}}
{{- $defaults := dict "listen" (printf "0.0.0.0:%d" (int .Values.containerPort)) "instance" (dict "id" "${SKYROUTE_INSTANCE_ID}") }}
{{- if .Values.secrets.adminKeyKey }}
{{- $_ := set $defaults "admin" (dict "key" "${SKYROUTE_ADMIN_KEY}") }}
{{- end }}
{{- if .Values.sync.enabled }}
{{- /* With the port: skyroute assumes 8080 without one, and containerPort can differ. */}}
{{- $sync := dict "token" "${SKYROUTE_SYNC_TOKEN}" "discovery" (printf "dns:%s.%s.svc.cluster.local:%d" (include "skyroute.headlessName" .) .Release.Namespace (int .Values.containerPort)) }}
{{- with .Values.sync.discoveryInterval }}
{{- $_ := set $sync "discovery_interval" . }}
{{- end }}
{{- with .Values.sync.peers }}
{{- $_ := set $sync "peers" . }}
{{- end }}
{{- $_ := set $defaults "sync" $sync }}
{{- end }}
{{- if .Values.jobs.enabled }}
{{- $jobs := dict "data_dir" "/var/lib/skyroute/jobs" }}
{{- with .Values.jobs.redisUrl }}
{{- $_ := set $jobs "redis" (dict "url" .) }}
{{- end }}
{{- $_ := set $defaults "jobs" $jobs }}
{{- end }}
{{- toYaml (mergeOverwrite $defaults (deepCopy .Values.routing)) }}
{{- end }}

{{- define "skyroute.dataClaimName" -}}
{{- .Values.jobs.persistence.existingClaim | default (printf "%s-data" (include "skyroute.fullname" .) | trunc 63 | trimSuffix "-") }}
{{- end }}

{{/* More than one pod may run: replicaCount > 1, or an autoscaler that may add pods. */}}
{{- define "skyroute.manyPods" -}}
{{- if or (gt (int .Values.replicaCount) 1) (and .Values.autoscaling.enabled (gt (int .Values.autoscaling.maxReplicas) 1)) }}true{{ end }}
{{- end }}

{{/*
Cross-field checks the JSON schema cannot express. Each failure names the value to fix.
*/}}
{{- define "skyroute.validate" -}}
{{- $upstreams := list }}
{{- range $i, $u := .Values.routing.upstreams }}
{{- /* vertex and bedrock have a public endpoint per region: their url is optional */}}
{{- $cloud := has (default "openai" $u.provider) (list "vertex" "bedrock") }}
{{- if and (hasKey $u "url") (hasKey $u "endpoints") }}
{{- fail (printf "routing.upstreams[%d] (upstream %q): give either 'url' (one server) or 'endpoints' (a pool), not both" $i $u.name) }}
{{- else if and (not $cloud) (not (hasKey $u "url")) (not (hasKey $u "endpoints")) }}
{{- fail (printf "routing.upstreams[%d] (upstream %q): give either 'url' (one server) or 'endpoints' (a pool)" $i $u.name) }}
{{- end }}
{{- end }}
{{- range .Values.routing.upstreams }}
{{- if has .name $upstreams }}
{{- fail (printf "routing.upstreams: upstream name %q is used twice" .name) }}
{{- end }}
{{- $upstreams = append $upstreams .name }}
{{- end }}
{{- range $i, $route := .Values.routing.routes | default list }}
{{- range $route.targets }}
{{- if not (has . $upstreams) }}
{{- fail (printf "routing.routes[%d] (model %q): target %q names no upstream in routing.upstreams (defined: %s)" $i $route.model . (join ", " $upstreams)) }}
{{- end }}
{{- end }}
{{- end }}
{{- $secretRef := "^[$][{][A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?[}]$" }}
{{- $secretFields := list }}
{{- range $i, $k := (.Values.routing.auth | default dict).api_keys | default list }}
{{- $secretFields = append $secretFields (list (printf "routing.auth.api_keys[%d].key" $i) $k.key) }}
{{- end }}
{{- range $i, $u := .Values.routing.upstreams }}
{{- if hasKey $u "api_key" }}
{{- $secretFields = append $secretFields (list (printf "routing.upstreams[%d].api_key (upstream %q)" $i $u.name) $u.api_key) }}
{{- end }}
{{- end }}
{{- with .Values.routing.admin }}{{ if hasKey . "key" }}{{ $secretFields = append $secretFields (list "routing.admin.key" .key) }}{{ end }}{{ end }}
{{- with .Values.routing.sync }}{{ if hasKey . "token" }}{{ $secretFields = append $secretFields (list "routing.sync.token" .token) }}{{ end }}{{ end }}
{{- range $secretFields }}
{{- if not (regexMatch $secretRef (toString (index . 1))) }}
{{- fail (printf "%s holds a literal value: secrets are never written in values. Put the secret in a Kubernetes Secret, add {name: MY_KEY, key: <key in the Secret>} to secrets.env, and write ${MY_KEY} here" (index . 0)) }}
{{- end }}
{{- end }}
{{- $provided := list "SKYROUTE_INSTANCE_ID" "SKYROUTE_POD_IP" "SKYROUTE_REGION" "SKYROUTE_LOG_LEVEL" "SKYROUTE_SHUTDOWN_GRACE_SECONDS" "TMPDIR" }}
{{- if .Values.secrets.adminKeyKey }}{{ $provided = append $provided "SKYROUTE_ADMIN_KEY" }}{{ end }}
{{- if .Values.sync.enabled }}{{ $provided = append $provided "SKYROUTE_SYNC_TOKEN" }}{{ end }}
{{- range concat (.Values.secrets.env | default list) (.Values.extraEnv | default list) }}{{ $provided = append $provided .name }}{{ end }}
{{- range regexFindAll "[$][{][A-Za-z_][A-Za-z0-9_]*[}]" (include "skyroute.routing" .) -1 }}
{{- $var := trimPrefix "${" . | trimSuffix "}" }}
{{- if not (has $var $provided) }}
{{- fail (printf "routing uses %s but the pods get no env var %s: add {name: %s, key: <key in the Secret>} to secrets.env (or write ${%s:-default})" . $var $var $var) }}
{{- end }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail (printf "autoscaling.minReplicas (%d) is greater than autoscaling.maxReplicas (%d)" (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- end }}
{{- if and .Values.sync.enabled (not .Values.secrets.syncTokenKey) }}
{{- fail "sync.enabled is true but secrets.syncTokenKey is empty: peers authenticate with the sync token" }}
{{- end }}
{{- if and .Values.sync.ingress.enabled (not .Values.sync.enabled) }}
{{- fail "sync.ingress.enabled is true but sync.enabled is false" }}
{{- end }}
{{- if and .Values.sync.ingress.enabled (not .Values.sync.ingress.host) }}
{{- fail "sync.ingress.enabled is true but sync.ingress.host is empty: the other regions need a host name to reach /sync" }}
{{- end }}
{{- if and .Values.jobs.enabled (include "skyroute.manyPods" .) }}
{{- $routingJobs := .Values.routing.jobs | default dict }}
{{- if not (or .Values.jobs.redisUrl $routingJobs.redis) }}
{{- fail "jobs.enabled with more than one pod (replicaCount or autoscaling.maxReplicas above 1) needs jobs.redisUrl: the SQLite queue belongs to one pod. Set jobs.redisUrl to a Redis every pod reaches, or run one pod (replicaCount: 1, autoscaling.enabled: false)" }}
{{- end }}
{{- if and .Values.jobs.persistence.enabled (not .Values.jobs.persistence.existingClaim) (not (has "ReadWriteMany" .Values.jobs.persistence.accessModes)) }}
{{- fail "jobs.persistence with more than one pod: every pod mounts the data volume (uploaded files, batch results), so set jobs.persistence.accessModes: [ReadWriteMany] (NFS, EFS, Filestore, Azure Files) or jobs.persistence.existingClaim" }}
{{- end }}
{{- end }}
{{- if and .Values.serviceMonitor.enabled (not (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1")) }}
{{- fail "serviceMonitor.enabled is true but the cluster has no monitoring.coreos.com/v1 API (install the Prometheus Operator CRDs, or pass --api-versions monitoring.coreos.com/v1 to helm template)" }}
{{- end }}
{{- end }}

{{/* Names of the Secrets the pods read, for the rollout checksum. */}}
{{- define "skyroute.secretNames" -}}
{{- $names := list .Values.secrets.existingSecret }}
{{- range .Values.secrets.env }}
{{- $names = append $names (.secretName | default $.Values.secrets.existingSecret) }}
{{- end }}
{{- $names | uniq | sortAlpha | join "," }}
{{- end }}
