{{- define "pyrsia-operator.name" -}}pyrsia-operator{{- end -}}
{{- define "pyrsia-operator.fullname" -}}{{ printf "%s-pyrsia-operator" .Release.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- define "pyrsia-operator.selector" -}}
app.kubernetes.io/name: pyrsia-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{- define "pyrsia-operator.labels" -}}
{{ include "pyrsia-operator.selector" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}
{{- define "pyrsia-operator.image" -}}{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}{{- end -}}
