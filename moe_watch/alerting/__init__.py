"""moe-watch's Prometheus rules: alert specs, recording rules, their promtool tests and the
thresholds table, generated from one place (docs/alerts.md).

- config.py         what a site may change (RulesConfig) and how `moe-watch rules` reads it
- specs.py          the alerts: expression, threshold, `for:`, severity, texts
- fixtures.py       the promtool fixtures of each alert, keyed by its name
- promql.py         recording rules (autoscale, forecasts, engines that span nodes)
- rule_file.py      rule groups and the PrometheusRule
- promtool_tests.py promtool unit tests from the fixtures
- texts.py          the annotation templates and a small interpreter of them
- thresholds_doc.py docs/thresholds.md
- files.py          the rule files, by path (moe_watch/generate writes them with the rest)
"""
