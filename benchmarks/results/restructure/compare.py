import json, statistics, glob
def load(kind, v):
    out = {}
    for f in sorted(glob.glob(f"benchmarks/results/restructure/{kind}_{v}_*.json")):
        for r in json.load(open(f))["rows"]:
            if r["implementation"] != "adamkit": continue
            out.setdefault((r["optimizer"], r["state_dtype"]), []).append(r["ratio_to_torch_fused_adamw"])
    return out
print("| shapes | optimizer | state | before (ratio, runs) | after (ratio, runs) | median change |")
print("|---|---|---|---|---|---|")
changes = []; spreads = []
for kind in ("gpt2", "rn"):
    b, a = load(kind, "before"), load(kind, "after")
    for key in sorted(b):
        if key not in a: continue
        mb, ma = statistics.median(b[key]), statistics.median(a[key])
        spreads += [max(b[key]) - min(b[key]), max(a[key]) - min(a[key])]
        changes.append((ma - mb) / mb)
        print(f"| {'gpt2 x0.25' if kind=='gpt2' else 'resnet18'} | {key[0]} | {key[1]} | {mb:.2f} ({', '.join(f'{x:.2f}' for x in b[key])}) | {ma:.2f} ({', '.join(f'{x:.2f}' for x in a[key])}) | {100*(ma-mb)/mb:+.1f}% |")
print("median |change|: %.1f%%; median within-version spread: %.3f; max |change| %.1f%%" % (100*statistics.median(abs(c) for c in changes), statistics.median(spreads), 100*max(abs(c) for c in changes)))
