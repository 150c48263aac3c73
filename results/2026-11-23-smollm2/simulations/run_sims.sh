#!/bin/bash
# Every independent simulation of EVAL.md, one after the other on one thread.
export OMP_NUM_THREADS=1
# usage: bash run_sims.sh FOLDER   (FOLDER holds the EVAL.md eval outputs named below and prefixkv.json)
S=$(cd "$(dirname "$0")/../../../examples" && pwd)/simulation_check.py
cd "${1:-.}"
mkdir -p sims
run() { local out=$1; shift; python $S "$@" 2>&1 | grep -v Loading > sims/$out.log; }
run kivi2 ours_full_kivi2/results.json --recipe kivi2
run quant1bit quantalone/results.json --recipe quant1bit
run quant2bit quantalone/results.json --recipe quant2bit
run prefixkv_20 more/results.json --recipe prefixkv --record "prefixkv(calibration=prefixkv.json)" --prefixkv prefixkv.json
run snapkv+quant1bit_20 more/results.json --recipe snapkv+quant1bit
run snapkv+quant2bit_20 quantmore/results.json --recipe snapkv+quant2bit
run snapkv+kivi2_50 ours/results.json --recipe snapkv+kivi2 --budget 0.5
run whatif_quant1bit_keepfirst4 quantalone/results.json --recipe quant1bit --keep-first 4
run whatif_quant2bit_keepfirst4 quantalone/results.json --recipe quant2bit --keep-first 4
echo done > sims/DONE
