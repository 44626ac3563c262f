{{/* Full name of the release's objects. */}}
{{- define "caravan.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "caravan.labels" -}}
app.kubernetes.io/part-of: caravan
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "caravan.operatorSelector" -}}
app.kubernetes.io/name: caravan-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "caravan.repositorySelector" -}}
app.kubernetes.io/name: caravan-repository
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "caravan.serviceAccountName" -}}
{{- default (include "caravan.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "caravan.repositoryURL" -}}
{{- printf "http://%s-repository.%s.svc:%d" (include "caravan.fullname" .) .Release.Namespace (int .Values.repository.port) -}}
{{- end -}}

{{- define "caravan.defaultRepositories" -}}
{{- $repos := .Values.agent.defaultRepositories -}}
{{- if .Values.repository.enabled -}}
{{- $repos = append $repos (include "caravan.repositoryURL" .) -}}
{{- end -}}
{{- join "," $repos -}}
{{- end -}}

{{/* Locked-down container security context shared by every container. */}}
{{- define "caravan.containerSecurityContext" -}}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "caravan.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Namespaces given Secret access by a Role (comma-separated); empty: cluster-wide. */}}
{{- define "caravan.secretNamespaces" -}}
{{- $ns := .Values.rbac.secretNamespaces | default list -}}
{{- if and (not $ns) .Values.operator.watchNamespace -}}
{{- $ns = list .Values.operator.watchNamespace -}}
{{- end -}}
{{- join "," $ns -}}

{{- end -}}

{{/* "repository:tag" of an image dict; an empty tag is the chart's appVersion. */}}
{{- define "caravan.image" -}}
{{- $img := index . 0 -}}{{- $ctx := index . 1 -}}
{{- printf "%s:%s" $img.repository (default $ctx.Chart.AppVersion $img.tag) -}}
{{- end -}}

{{/* imagePullSecrets entries from a list of names or {name: …} maps. */}}
{{- define "caravan.pullSecretNames" -}}
{{- $names := list -}}
{{- range . -}}
{{- if kindIs "map" . -}}{{- $names = append $names .name -}}{{- else -}}{{- $names = append $names (toString .) -}}{{- end -}}
{{- end -}}
{{- join "," $names -}}
{{- end -}}

{{- define "caravan.imagePullSecrets" -}}
{{- $names := include "caravan.pullSecretNames" . -}}
{{- if $names }}
imagePullSecrets:
{{- range splitList "," $names }}
  - name: {{ . | quote }}
{{- end }}
{{- end -}}
{{- end -}}

{{/* The agents' default scheduling as JSON, without empty fields (an empty
field must leave the agent pod template as it is). */}}
{{- define "caravan.agentScheduling" -}}
{{- $out := dict -}}
{{- range $k, $v := .Values.agent.scheduling -}}
{{- if $v -}}{{- $_ := set $out $k $v -}}{{- end -}}
{{- end -}}
{{- if $out -}}{{- toJson $out -}}{{- end -}}
{{- end -}}

{{/* "k=v,k=v" from a map. */}}
{{- define "caravan.labelList" -}}
{{- $pairs := list -}}
{{- range $k, $v := . -}}{{- $pairs = append $pairs (printf "%s=%s" $k $v) -}}{{- end -}}
{{- join "," $pairs -}}
{{- end -}}

{{/* policy/v1 where served (1.21+), else policy/v1beta1 (1.20). */}}
{{- define "caravan.pdbApiVersion" -}}
{{- if .Capabilities.APIVersions.Has "policy/v1/PodDisruptionBudget" -}}policy/v1{{- else -}}policy/v1beta1{{- end -}}
{{- end -}}

{{/* Removes x-kubernetes-validations blocks (CEL rules) from generated CRD
YAML, for API servers before 1.25 that refuse the unknown field under
server-side apply. The operator enforces the same rules itself. */}}
{{- define "caravan.stripCel" -}}
{{- $t := . -}}
{{- range $n := until 40 -}}
{{- $ind := repeat $n " " -}}
{{- $t = regexReplaceAll (printf "(?m)^%sx-kubernetes-validations:\n(?:%s- .*\n|%s  .*\n)*" $ind $ind $ind) $t "" -}}
{{- end -}}
{{- $t -}}
{{- end -}}

{{- define "caravan.repositoryStorageRoot" -}}/var/lib/caravan-repository{{- end -}}

{{- define "caravan.crdMeta" -}}
{{- if .Values.crds.keep }}
  annotations:
    helm.sh/resource-policy: keep
{{- end }}
  labels:
    {{- include "caravan.labels" . | nindent 4 }}
{{- end -}}
