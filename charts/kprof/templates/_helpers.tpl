{{/* Common names and labels. */}}
{{- define "kprof.labels" -}}
app.kubernetes.io/name: kprof
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kprof.operatorSelector" -}}
app.kubernetes.io/name: kprof
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kprof.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{/* The names of a list of image pull secrets, given as Kubernetes writes them ({name: x})
     or as plain names, as a JSON list. */}}
{{- define "kprof.pullSecretNames" -}}
{{- $names := list -}}
{{- range . -}}
{{- if kindIs "string" . -}}
{{- $names = append $names . -}}
{{- else -}}
{{- $names = append $names .name -}}
{{- end -}}
{{- end -}}
{{- toJson $names -}}
{{- end -}}

{{/* Where the store keeps artifacts: "none" (store.url, an object store), "pvc" or "emptyDir". */}}
{{- define "kprof.storeVolume" -}}
{{- if .Values.store.url -}}none
{{- else if .Values.store.persistence.enabled -}}pvc
{{- else -}}emptyDir
{{- end -}}
{{- end -}}

{{/* Non-empty when every replica on any node sees the same artifacts: an object store, or a
     ReadWriteMany volume. */}}
{{- define "kprof.storeShared" -}}
{{- if .Values.store.url -}}true
{{- else if and .Values.store.persistence.enabled (has "ReadWriteMany" .Values.store.persistence.accessModes) -}}true
{{- end -}}
{{- end -}}
