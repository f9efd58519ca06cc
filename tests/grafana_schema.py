"""Type-check dashboards against Grafana's published schema (npm @grafana/schema) with tsc.

@grafana/schema ships the dashboard schema as TypeScript types generated from Grafana's CUE
kinds: `Dashboard`, `Panel`, `RowPanel`, `FieldConfigSource`, ... (dist/types/raw/dashboard/x)
and each core panel plugin's `Options`/`FieldConfig` (dist/types/raw/composable/<panel>/panelcfg).
Each dashboard becomes a .ts file in which every panel is an object literal that must satisfy
`Panel` with its plugin's options and custom field config (per `type`), and the dashboard must
satisfy `Dashboard`; `tsc --strict --noEmit` then rejects a wrong type, a missing required field
or an unknown field (TypeScript's excess-property check on object literals).

Two adaptations, both spelled out in PRELUDE: JSON carries an enum's value ("absolute"), not the
TypeScript enum member (`ThresholdsMode.Absolute`), so `Json<T>` turns every string enum into the
union of its values; and saved panels may omit options Grafana fills with defaults, so a panel's
top-level options and custom field config are `Partial` (nested objects stay exact). The package
has no Prometheus query type, so targets are `DataQuery` plus the Prometheus fields we write, and
transformation options are typed from @grafana/data's source (not in the package), below.

The toolchain is installed once by `npm install` into a cache directory (pinned versions) and
reused; `ensure_toolchain` does it on a clean machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

SCHEMA_VERSION = "13.2.3"  # @grafana/schema, Grafana 13.2's dashboard and panel schema
TYPESCRIPT_VERSION = "5.9.3"
CACHE = Path(
    os.environ.get("MOE_WATCH_GRAFANA_SCHEMA_CACHE")
    or Path.home()
    / ".cache"
    / "moe-watch"
    / f"grafana-schema-{SCHEMA_VERSION}-ts{TYPESCRIPT_VERSION}"
)

# Each panel type we ship -> the module of its plugin's Options (and custom FieldConfig, which
# bargauge and stat do not have: any custom field option there is an error) in @grafana/schema.
_PANELCFG = "@grafana/schema/dist/esm/raw/composable/{0}/panelcfg/x/{1}PanelCfg_types.gen"
PANEL_TYPES = {
    "timeseries": (_PANELCFG.format("timeseries", "TimeSeries"), True),
    "table": (_PANELCFG.format("table", "Table"), True),
    "bargauge": (_PANELCFG.format("bargauge", "BarGauge"), False),
    "stat": (_PANELCFG.format("stat", "Stat"), False),
    "heatmap": (_PANELCFG.format("heatmap", "Heatmap"), True),
}

PRELUDE = """\
import type * as S from "@grafana/schema";
{imports}

// JSON holds a string enum's value, not the TypeScript enum member: map enums to their values.
type Json<T> = T extends string
  ? `${{T}}`
  : T extends Array<infer U>
    ? Array<Json<U>>
    : T extends object
      ? {{ [K in keyof T]: Json<T[K]> }}
      : T;

// Prometheus query fields (the package has no Prometheus DataQuery); refId etc. are Grafana's.
type PrometheusQuery = S.DataQuery & {{
  expr: string;
  legendFormat?: string;
  instant?: boolean;
  range?: boolean;
  format?: "time_series" | "table" | "heatmap";
}};

// A Prometheus annotation: its query in `target` (where Grafana's Prometheus datasource moves a
// legacy top-level `expr`), and the event fields it reads beside it (@grafana/prometheus,
// annotations.ts; the package has no type for them).
type PrometheusAnnotation = S.AnnotationQuery<PrometheusQuery> & {{
  titleFormat?: string;
  textFormat?: string;
  tagKeys?: string;
  useValueForTime?: boolean;
}};
type Dashboard = Omit<S.Dashboard, "annotations"> & {{
  annotations?: {{ list?: PrometheusAnnotation[] }};
}};

// Transformations we use; options as in @grafana/data (transformers/groupingToMatrix.ts,
// merge.ts, organize.ts, convertFieldType.ts, sortBy.ts); Grafana's DataTransformerConfig types options as unknown.
type Transformation = Omit<S.DataTransformerConfig, "id" | "options"> &
  (
    | {{ id: "groupingToMatrix"; options: {{ columnField?: string; rowField?: string; valueField?: string; emptyValue?: "null" | "true" | "false" | "empty" }} }}
    | {{ id: "merge"; options: Record<string, never> }}
    | {{ id: "convertFieldType"; options: {{ conversions: Array<{{ targetField?: string; destinationType?: "time" | "number" | "string" | "boolean" | "enum" | "other"; dateFormat?: string; joinWith?: string }}> }} }}
    | {{ id: "sortBy"; options: {{ sort: Array<{{ field: string; desc?: boolean; index?: number }}> }} }}
    | {{ id: "organize"; options: {{ excludeByName?: Record<string, boolean>; indexByName?: Record<string, number>; renameByName?: Record<string, string> }} }}
  );

type FieldConfigSource<Custom> = Omit<S.FieldConfigSource, "defaults" | "overrides"> & {{
  defaults: Omit<S.FieldConfig, "custom"> & {{ custom?: Partial<Custom> }};
  overrides: Array<{{
    matcher: S.MatcherConfig;
    properties: Array<{{ id: string; value?: unknown }}>;
  }}>;
}};

type TypedPanel<Kind extends string, Options, Custom> = Omit<
  S.Panel,
  "type" | "options" | "fieldConfig" | "targets" | "transformations"
> & {{
  type: Kind;
  options: Partial<Options>;
  fieldConfig: FieldConfigSource<Custom>;
  targets: PrometheusQuery[];
  transformations?: Transformation[];
}};
"""


def ensure_toolchain(cache: Path = CACHE) -> Path:
    """Install @grafana/schema and typescript (pinned) into ``cache`` once; return tsc's path."""
    tsc = cache / "node_modules" / "typescript" / "bin" / "tsc"
    schema = cache / "node_modules" / "@grafana" / "schema" / "package.json"
    if (
        tsc.exists()
        and schema.exists()
        and json.loads(schema.read_text())["version"] == SCHEMA_VERSION
    ):
        return tsc
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is missing: apt-get install -y nodejs npm (scripts/test.sh does)")
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [npm, "install", "--prefix", str(cache), "--no-audit", "--no-fund", "--ignore-scripts",
         f"@grafana/schema@{SCHEMA_VERSION}", f"typescript@{TYPESCRIPT_VERSION}"],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    return tsc


def dashboard_ts(board: dict[str, Any]) -> str:
    """A TypeScript module in which ``board`` must satisfy Grafana's dashboard schema."""
    used = sorted({p["type"] for p in _all_panels(board)} - {"row"})
    unknown = [kind for kind in used if kind not in PANEL_TYPES]
    if unknown:
        raise ValueError(f"no schema mapping for panel type(s) {unknown}: add to PANEL_TYPES")
    imports = "\n".join(
        f'import type {{ Options as {_ident(k)}Options{custom} }} from "{module}";'
        if has_custom
        else f'import type {{ Options as {_ident(k)}Options }} from "{module}";\n'
        f"type {_ident(k)}Custom = Record<string, never>;"
        for k in used
        for module, has_custom in [PANEL_TYPES[k]]
        for custom in [f", FieldConfig as {_ident(k)}Custom"]
    )
    lines = [PRELUDE.format(imports=imports)]
    names = []
    for index, panel in enumerate(board.get("panels", [])):
        name = f"panel{index}"
        names.append(name)
        if panel.get("type") == "row":
            inner = [_typed(p) for p in panel.get("panels", [])]
            row = {**panel, "panels": "__PANELS__"}
            text = _literal(row).replace('"__PANELS__"', "[" + ", ".join(inner) + "]")
            lines.append(f"const {name}: Json<S.RowPanel> = {text};")
        else:
            lines.append(f"const {name} = {_typed(panel)};")
    rest = {k: v for k, v in board.items() if k != "panels"}
    text = _literal({**rest, "panels": "__PANELS__"}).replace(
        '"__PANELS__"', "[" + ", ".join(names) + "]"
    )
    lines.append(f"export const dashboard: Json<Dashboard> = {text};")
    return "\n".join(lines) + "\n"


def typecheck(boards: dict[str, dict[str, Any]], work: Path) -> subprocess.CompletedProcess[str]:
    """Run `tsc --strict --noEmit` over one module per dashboard; returncode 0 is schema-valid."""
    tsc = ensure_toolchain()
    work.mkdir(parents=True, exist_ok=True)
    modules = work / "node_modules"
    if not modules.exists():
        modules.symlink_to(tsc.parents[2], target_is_directory=True)
    files = []
    for name, board in boards.items():
        path = work / f"{name}.ts"
        path.write_text(dashboard_ts(board))
        files.append(path.name)
    (work / "tsconfig.json").write_text(json.dumps({
        "compilerOptions": {
            "strict": True, "noEmit": True, "target": "es2022", "module": "esnext",
            "moduleResolution": "bundler", "skipLibCheck": True, "types": [],
        },
        "files": files,
    }))  # fmt: skip
    node = shutil.which("node") or "node"
    return subprocess.run(
        [node, str(tsc), "-p", str(work / "tsconfig.json"), "--pretty", "false"],
        capture_output=True, text=True, timeout=300, cwd=work,
    )  # fmt: skip


def _all_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in board.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []) if panel.get("type") == "row" else [])
    return out


def _ident(kind: str) -> str:
    return kind[:1].upper() + kind[1:]


def _typed(panel: dict[str, Any]) -> str:
    kind = panel.get("type")
    if kind not in PANEL_TYPES:  # an unknown type is checked as a plain Panel
        return f"({_literal(panel)} satisfies Json<S.Panel>)"
    k = _ident(str(kind))
    return f'({_literal(panel)} satisfies Json<TypedPanel<"{kind}", {k}Options, {k}Custom>>)'


def _literal(value: Any) -> str:
    return json.dumps(value, indent=1)
