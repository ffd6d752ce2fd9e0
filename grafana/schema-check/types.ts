// Grafana's own dashboard types (pinned @grafana/schema), narrowed to what UGRO's
// dashboards may contain, so that `tsc --strict` rejects unknown fields, wrong
// types, unknown enum values and panel options that the panel plugin does not have.
//
// The schema's string enums (ThresholdsMode.Absolute = "absolute", ...) do not
// accept plain strings, and dashboard JSON has plain strings: Lit<T> maps every
// string enum to the union of its literal values, recursively.

import type {
  Dashboard,
  DataTransformerConfig,
  FieldConfig,
  FieldConfigSource,
  Panel,
  RowPanel,
  VariableModel,
  AnnotationQuery,
} from "@grafana/schema";
import type * as BarGauge from "@grafana/schema/dist/esm/raw/composable/bargauge/panelcfg/x/BarGaugePanelCfg_types.gen.d.ts";
import type * as Stat from "@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen.d.ts";
import type * as StateTimeline from "@grafana/schema/dist/esm/raw/composable/statetimeline/panelcfg/x/StateTimelinePanelCfg_types.gen.d.ts";
import type * as Table from "@grafana/schema/dist/esm/raw/composable/table/panelcfg/x/TablePanelCfg_types.gen.d.ts";
import type * as TimeSeries from "@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen.d.ts";
import type * as XYChart from "@grafana/schema/dist/esm/raw/composable/xychart2/panelcfg/x/XYChartPanelCfg_types.gen.d.ts";

export type Lit<T> = T extends string
  ? `${T}`
  : T extends number | boolean | bigint | symbol | null | undefined
    ? T
    : T extends ReadonlyArray<infer U>
      ? Array<Lit<U>>
      : T extends object
        ? { [K in keyof T]: Lit<T[K]> }
        : T;

/** Every panel and query names the dashboard's `datasource` variable (file provisioning). */
export interface PromDatasource {
  type: "prometheus";
  uid: "${datasource}";
}

/** The Prometheus data source's query model (Grafana's prometheus dataquery.gen.ts). */
export interface PromQuery {
  refId: string;
  datasource: PromDatasource;
  expr: string;
  legendFormat?: string;
  range?: boolean;
  instant?: boolean;
  format?: "time_series" | "table" | "heatmap";
  interval?: string;
  intervalFactor?: number;
  editorMode?: "code" | "builder";
  exemplar?: boolean;
  hide?: boolean;
}

/** Field defaults with a required unit and the panel plugin's own (strict) custom options. */
type Defaults<Custom> = Omit<FieldConfig, "custom"> & { unit: string; custom?: Partial<Custom> };

type PanelOf<Kind extends string, Options, Custom> = Omit<
  Panel<Options, Custom>,
  "type" | "targets" | "datasource" | "options" | "fieldConfig" | "transformations"
> & {
  type: Kind;
  id: number;
  title: string;
  description: string;
  gridPos: { x: number; y: number; w: number; h: number };
  datasource: PromDatasource;
  targets: PromQuery[];
  options: Partial<Options>;
  fieldConfig: Omit<FieldConfigSource, "defaults"> & { defaults: Defaults<Custom> };
  transformations?: DataTransformerConfig[];
};

export type UgroPanel =
  | PanelOf<"timeseries", TimeSeries.Options, TimeSeries.FieldConfig>
  | PanelOf<"stat", Stat.Options, Record<string, never>>
  | PanelOf<"bargauge", BarGauge.Options, Record<string, never>>
  | PanelOf<"table", Table.Options, Table.FieldConfig>
  | PanelOf<"state-timeline", StateTimeline.Options, StateTimeline.FieldConfig>
  | PanelOf<"xychart", XYChart.Options, XYChart.FieldConfig>;

export type UgroRow = Omit<RowPanel, "panels" | "type"> & {
  type: "row";
  id: number;
  title: string;
  panels: [];
  collapsed: false;
};

export type UgroVariable = Omit<VariableModel, "type"> & {
  type: "datasource" | "query" | "custom" | "interval" | "constant" | "textbox";
};

export type UgroAnnotation = Omit<AnnotationQuery, "target"> & {
  expr?: string;
  step?: string;
  titleFormat?: string;
  tagKeys?: string;
  textFormat?: string;
  useValueForTime?: boolean;
};

export type UgroDashboard = Lit<
  Omit<Dashboard, "panels" | "templating" | "annotations" | "schemaVersion" | "__inputs"> & {
    uid: string;
    title: string;
    description: string;
    schemaVersion: 41;
    panels: Array<UgroPanel | UgroRow>;
    templating: { list: UgroVariable[] };
    annotations: { list: UgroAnnotation[] };
  }
>;
