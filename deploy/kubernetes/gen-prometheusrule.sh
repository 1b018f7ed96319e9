#!/bin/sh
# Prints deploy/prometheus/alerts.yml wrapped as a PrometheusRule (run from the repository root).
set -eu
cat <<'HEAD'
# The rules of deploy/prometheus/alerts.yml as a PrometheusRule, for the Prometheus Operator.
# Generated from alerts.yml (tests/tests/deploy_files.rs fails if the two differ). Regenerate with
#   sh deploy/kubernetes/gen-prometheusrule.sh > deploy/kubernetes/prometheusrule.yaml
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: gsb
  namespace: gsb
  labels:
    app.kubernetes.io/part-of: gsb
spec:
HEAD
# Everything from `groups:` on, indented under spec (blank lines kept blank).
sed -n '/^groups:/,$p' deploy/prometheus/alerts.yml | sed 's/^\(.\)/  \1/'
