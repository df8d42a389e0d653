python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
(timeout 300 python3 -c "from patchc.codegen import mma_sp; assert mma_sp.extension()") &
(timeout 300 python3 -c "from patchc.codegen import wgmma; assert wgmma.extension()") &
wait
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,temperature.memory,clocks_throttle_reasons.active --format=csv -lms 250 > $OUT/smi.csv 2>&1 &
SMI=$!
S=$SECONDS
i=0
for row in patch-0.35 patch-0.45 patch-0.35 patch-0.35 patch-0.45; do
  i=$((i+1))
  if [ $((SECONDS - S)) -gt 380 ]; then echo "time: stop before $i $row"; break; fi
  echo "$(date +%H:%M:%S.%N) start $i $row" >> $OUT/marks.log
  timeout 120 python3 bench/e2e.py --out $OUT/e2e_$i --sparsities 0.35,0.45 --row $row > $OUT/row_$i.log 2>&1
  echo "$(date +%H:%M:%S.%N) end $i $row" >> $OUT/marks.log
  echo "$i $row $(tail -n 1 $OUT/e2e_$i/rows/$row.json 2>/dev/null | cut -c1-160)"
done
kill $SMI
cd $OUT && tar czf logs.tgz row_*.log e2e_* && rm -rf row_*.log e2e_*
