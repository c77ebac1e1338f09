#!/usr/bin/env bash
# Rebuild the runs behind docs/findings.md (fleet size and uneven help), then every table and figure from
# the run directories. Usage: bash benchmarks/findings.sh [RUNS_DIR] [SECTION...]
#   RUNS_DIR  where the sweeps write (default: runs/); reports go to benchmarks/results/findings/
#   SECTION   fleet_size | labels | server_bias | central | partial | specialist | drift | tiered | reports;
#             a preset section may name one dataset, e.g. partial:digits (default: both). Default: every
#             section, in that order. Re-running a section starts its sweep directory again.
# Time on the 2-core reference machine: see benchmarks/README.md ("Findings runs").
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs}; shift || true
SECTIONS=${*:-"fleet_size labels server_bias central partial specialist drift tiered reports"}
OUT=benchmarks/results/findings
RUN="python -m sim.run -m sim.backend=inprocess sim.plots=false"
for sec in $SECTIONS; do
  s=${sec%%:*}; DATASETS=digits\ mnist1d; [[ $sec == *:* ]] && DATASETS=${sec#*:}
  case $s in
    fleet_size)  $RUN experiment=fleet_size data=mnist1d hydra.sweep.dir=$RUNS/fleet_size ;;
    labels)      $RUN experiment=fleet_size data=mnist1d fleet.num_clients=300 +variant=default \
                   strategy.server_labels=in_sample,holdout,prequential,crossfit hydra.sweep.dir=$RUNS/fleet_labels ;;
    server_bias) # the fleet_size preset's fleet and schedule without its L2H-only bound (confidence has no max_defer_rate)
                 $RUN data=mnist1d fleet.num_clients=300 data.num_samples=30000 sim.fraction_train=0.3 sim.eval_every=5 \
                   strategy=confidence strategy.defer_rate=0.3 'seed=0,1,2,3,4' hydra.sweep.dir=$RUNS/fleet_confidence ;;
    central)     $RUN experiment=centralised data=mnist1d strategy=l2h strategy.server_labels=in_sample \
                   strategy.explore=1.0 strategy.max_defer_rate=0.3 data.num_samples=30000 hydra.sweep.dir=$RUNS/fleet_central ;;
    partial)     for d in $DATASETS; do $RUN experiment=partial_server data=$d hydra.sweep.dir=$RUNS/partial_$d; done ;;
    specialist)  for d in $DATASETS; do $RUN experiment=specialist_servers data=$d hydra.sweep.dir=$RUNS/specialist_$d; done ;;
    drift)       for d in $DATASETS; do $RUN experiment=device_drift data=$d hydra.sweep.dir=$RUNS/drift_$d; done ;;
    tiered)      for d in $DATASETS; do
                   $RUN experiment=tiered_servers data=$d hydra.sweep.dir=$RUNS/tiered_$d
                   $RUN experiment=tiered_servers data=$d +tier=both 'servers.c_e=[0.05,0.1],[0.05,0.6]' \
                     hydra.sweep.dir=$RUNS/tiered_price_$d
                 done ;;
    reports)
      python -m sim.report $RUNS/fleet_size --out $OUT/fleet_size
      python -m sim.report $RUNS/fleet_labels --out $OUT/fleet_labels --baseline strategy.server_labels=in_sample
      python -m sim.report $RUNS/fleet_central --out $OUT/fleet_central
      for d in digits mnist1d; do
        python -m sim.report $RUNS/partial_$d --out $OUT/partial_$d --baseline strategy.name=confidence
        python -m sim.report $RUNS/specialist_$d --out $OUT/specialist_$d --baseline servers.routing=round_robin
        python -m sim.report $RUNS/drift_$d --out $OUT/drift_$d --baseline strategy.name=confidence
        python -m sim.report $RUNS/tiered_$d $RUNS/tiered_price_$d --out $OUT/tiered_$d
      done
      python benchmarks/findings_tables.py $RUNS $OUT ;;
    *) echo "unknown section $sec" >&2; exit 2 ;;
  esac
done
