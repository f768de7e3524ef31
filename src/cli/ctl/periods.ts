// bcache's stats periods, in the order ctl shows them: stats_total/,
// stats_five_minute/, stats_hour/, stats_day/.

export const PERIODS = ['total', 'five_minute', 'hour', 'day'] as const;
export type Period = (typeof PERIODS)[number];
