#!/usr/bin/env bash
# Regenerates prometheusrule.yaml from dashboards/alerts.yaml: the same
# groups, byte for byte, indented two more spaces under `spec:`.
# tests/deploy.rs fails when the two differ, so run this after every edit
# of dashboards/alerts.yaml.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
alerts="$here/../../dashboards/alerts.yaml"
out="$here/prometheusrule.yaml"

if ! grep -q '^groups:$' "$alerts"; then
    echo "gen-prometheusrule.sh: no top-level 'groups:' line in $alerts" >&2
    exit 1
fi

{
    cat <<'HEADER'
# Generated from dashboards/alerts.yaml by gen-prometheusrule.sh: edit that
# file and run the script, never this one (tests/deploy.rs checks they agree).
# The rules sum every replica's series by experiment and variant, so they
# judge the fleet, not one pod.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: abgate
  labels:
    app.kubernetes.io/name: abgate
spec:
  groups:
HEADER
    # Everything after the top-level `groups:` line, two spaces deeper;
    # blank lines stay blank.
    awk 'in_groups { if ($0 == "") print ""; else print "  " $0 } /^groups:$/ { in_groups = 1 }' "$alerts"
} > "$out.tmp"
mv "$out.tmp" "$out"
echo "wrote $out"
