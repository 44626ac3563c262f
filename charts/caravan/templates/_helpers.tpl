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
