package clusterpool_test

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/clusterpool/clusterpool"
	"github.com/clusterpool/clusterpool/clustertest"
)

// TestSoak's flags: go test -run TestSoak -soak=10m -soak.seed=N . runs a
// longer soak, or replays a seed.
var (
	soakFlag     = flag.Duration("soak", 0, "how long TestSoak runs its load (0: 45s, 10s with -short)")
	soakSeedFlag = flag.Int64("soak.seed", 0, "seed for TestSoak's faults and load (0: $CLUSTERPOOL_SOAK_SEED, else random)")
)

const (
	soakSeedEnv      = "CLUSTERPOOL_SOAK_SEED"
	soakDefault      = 45 * time.Second
	soakShort        = 10 * time.Second
	soakNodes        = 4
	soakMaxNodes     = 6  // AddNode stops here
	soakMinNodes     = 3  // RemoveNode stops here
	soakMaxFaulted   = 2  // nodes with a fault at once
	soakMinHealthy   = 2  // nodes without a fault, at all times
	soakMaxConns     = 12 // the pool's MaxConns
	soakWorkers      = 24 // more callers than connections: acquires wait too
	soakProbeConns   = 1  // the probe's own short-lived connection
	soakHeapSlack    = 16 << 20
	soakQuietTimeout = time.Minute // generous: the machine is loaded
	soakStepTimeout  = time.Minute // one fault step (Drain, Restart, AddNode)
	// A server-side count above MaxConns+probe is allowed while the
	// connections the pool has just destroyed are still closing; longer
	// than this it is a leak.
	soakExcessGrace = 3 * time.Second
	// A partitioned proxy holds the bytes of closed connections too, so its
	// count is stale until a while after Heal.
	soakHealGrace = time.Second
	// Floors: a pool that refused or failed every call would still pass
	// the checks on what was applied. 20 ops/s is two orders of magnitude
	// below what a loaded 2-core VM does under -race; at most one write in
	// ten may end unacknowledged (runs see a few in ten thousand).
	soakMinOpsPerSec = 20
	soakMinAckedFrac = 0.9
)

// soakFaultKinds are the faults the soak injects; every run injects each
// at least once.
var soakFaultKinds = [...]string{"drain", "kill", "restart", "partition", "latency", "add", "remove"}

// soakAllowedClass reports whether callers may see errors of class: the
// README names ErrOutcomeUnknown and the callers' own 2–5 s deadlines
// ("canceled"); "late" is an error after a Query's first row or a batch's
// first result reached the caller, which docs/retries.md says the pool does
// not retry (the caller has already consumed part of the answer);
// "fresh-node" is clustertest's, a node routed to before its tables exist.
// Any other class (a connection error, not-sent, 40001, 40003, permanent)
// reaching a caller is a failure of the retry policy under faults it
// promises to absorb.
func soakAllowedClass(class string) bool {
	return class == "outcome-unknown" || class == "canceled" || class == "late" || class == "fresh-node"
}

// The tables. Only soak_idem has a key: a plain INSERT applied twice shows
// as two rows.
const soakSchema = `
	CREATE TABLE IF NOT EXISTS soak_ni (op BIGINT NOT NULL);
	CREATE INDEX IF NOT EXISTS soak_ni_op ON soak_ni (op);
	CREATE TABLE IF NOT EXISTS soak_idem (op BIGINT PRIMARY KEY);
	CREATE TABLE IF NOT EXISTS soak_tx (op BIGINT NOT NULL, part INT NOT NULL);
	CREATE TABLE IF NOT EXISTS soak_batch (op BIGINT NOT NULL, part INT NOT NULL);
	TRUNCATE soak_ni, soak_idem, soak_tx, soak_batch`

type soakOp uint8

const (
	soakInsert    soakOp = iota // plain INSERT, not idempotent
	soakUpsert                  // INSERT ... ON CONFLICT DO NOTHING, WithIdempotent
	soakTx                      // BeginFunc with two plain INSERTs
	soakBatch                   // SendBatch with two plain INSERTs (one implicit transaction)
	soakInsertSQL               // plain INSERT without arguments: pgx's simple protocol
	soakGet                     // QueryRow by key
	soakScan                    // Query over a range
)

// soakMix is the load's mix: writes are two thirds of it.
var soakMix = [...]soakOp{soakInsert, soakInsertSQL, soakUpsert, soakUpsert, soakTx, soakBatch, soakGet, soakScan, soakScan}

func (op soakOp) write() bool { return op <= soakInsertSQL }

func (op soakOp) String() string {
	return [...]string{"insert", "upsert", "BeginFunc", "SendBatch", "insert (simple protocol)", "QueryRow", "Query"}[op]
}

// soakResult is what the caller learnt about an operation.
type soakResult uint8

const (
	resPending soakResult = iota
	resAcked              // nil error: must be applied exactly once
	resUnknown            // matches ErrOutcomeUnknown: applied at most once
	resContext            // the caller's context error, not matching ErrOutcomeUnknown: must not be applied
	resLate               // a batch error after its first result: the caller's to resolve
	resFailed             // any other error: must not be applied
	resFresh              // 42P01 on a node added a moment before: must not be applied
)

// soakRecord is kept per operation, indexed by its sequence number within
// its worker, so a long run stays small.
type soakRecord struct {
	op  soakOp
	res soakResult
}

func soakOpID(worker, seq int) int64 { return int64(worker)<<32 | int64(seq) }

type opIDKey struct{}

// soakTracer records, per operation, the nodes of its failed attempts: an
// idempotent write retried after an attempt whose outcome was unknown may be
// applied on two nodes, since clustertest's nodes do not share data. It also
// keeps each retried operation's events, to explain a violation.
type soakTracer struct {
	start time.Time

	mu     sync.Mutex // protects the fields below
	failed map[int64][]int
	events map[int64][]string
}

func (tr *soakTracer) TraceRetry(ctx context.Context, _ *clusterpool.Pool, data clusterpool.TraceRetryData) {
	id, ok := ctx.Value(opIDKey{}).(int64)
	if !ok {
		return
	}
	tr.mu.Lock()
	defer tr.mu.Unlock()
	tr.failed[id] = append(tr.failed[id], int(data.Node))
	tr.eventLocked(id, fmt.Sprintf("attempt %d failed on node %d at %s (%s): %v; retry after %v",
		data.Attempt, data.Node, data.Stage, data.Class, data.Err, data.Delay))
}

func (tr *soakTracer) TraceRetryEnd(ctx context.Context, _ *clusterpool.Pool, data clusterpool.TraceRetryEndData) {
	id, ok := ctx.Value(opIDKey{}).(int64)
	if !ok {
		return
	}
	tr.mu.Lock()
	defer tr.mu.Unlock()
	tr.eventLocked(id, fmt.Sprintf("ended %s after %d attempts on nodes %v (%s): %v",
		data.Outcome, data.Attempts, data.Nodes, data.Class, data.Err))
}

func (tr *soakTracer) eventLocked(id int64, ev string) {
	if len(tr.events) < 100000 {
		tr.events[id] = append(tr.events[id], fmt.Sprintf("%v %s", time.Since(tr.start).Round(time.Millisecond), ev))
	}
}

// explain returns what the tracer saw of operation id.
func (tr *soakTracer) explain(id int64) string {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if len(tr.events[id]) == 0 {
		return "no retry events"
	}
	return strings.Join(tr.events[id], "; ")
}

type soak struct {
	c     *clustertest.Cluster
	pool  *clusterpool.Pool
	start time.Time

	records [soakWorkers][]soakRecord // each worker's own
	tracer  *soakTracer
	// nodes is the fault loop's own state; healAll reads it once the loop
	// has ended.
	nodes map[int]*soakNodeState

	mu         sync.Mutex // protects the fields below
	errClasses map[string]int
	errSamples []string
	ctxErrs    map[int64]string // writes ended by the caller's deadline: their errors
	faults     map[string]int
	faultLog   []string
	addWindows [][2]time.Time    // AddNode call to schema created
	unsettled  map[int]time.Time // node -> until when its proxy's count is stale (partition)
	removed    []*soakTally      // rows of removed nodes
	violations []string

	maxPool, maxServers atomic.Int64
}

// TestSoak runs mixed load on a 4-node cluster while random faults (drain,
// kill, restart, partition, latency, add and remove node) come and go, at
// most two nodes faulted at once, then checks what must hold whatever the
// faults were:
//
//   - every acknowledged write is present exactly once across the nodes'
//     databases (which are separate: a row lives on the node that wrote it),
//     no non-idempotent write is applied twice, and a write that failed with
//     an error not matching ErrOutcomeUnknown is absent;
//   - once quiet, the pool's per-node counts equal the servers' counts;
//   - the pool never holds more than MaxConns connections;
//   - after Close, goroutines and heap are back to their baseline;
//   - the run did work: at least soakMinOpsPerSec operations a second, nine
//     writes in ten acknowledged, every kind of fault injected at least
//     once (the load runs on until each has), and callers saw no error
//     class but ErrOutcomeUnknown and their own deadlines.
//
// The load runs for 45 s by default (10 s with -short). The seed (random by
// default) is logged; it replays the same fault and operation choices,
// though not the same interleaving. The last line is the summary the README
// quotes.
func TestSoak(t *testing.T) {
	dur := *soakFlag
	if dur == 0 {
		dur = soakDefault
		if testing.Short() {
			dur = soakShort
		}
	}
	seed := *soakSeedFlag
	if seed == 0 {
		if s := os.Getenv(soakSeedEnv); s != "" {
			var err error
			if seed, err = strconv.ParseInt(s, 10, 64); err != nil {
				t.Fatalf("%s=%q: %v", soakSeedEnv, s, err)
			}
		}
	}
	if seed == 0 {
		seed = rand.Int64N(1<<31) + 1
	}
	t.Logf("soak: seed=%d (replay with -soak.seed=%d or %s=%d)", seed, seed, soakSeedEnv, seed)

	c := clustertest.New(t, clustertest.Options{Nodes: soakNodes, Seed: seed})
	ctx, cancel := context.WithTimeout(context.Background(), soakStepTimeout)
	defer cancel()
	for _, n := range c.Nodes() {
		if err := n.ExecDirect(ctx, soakSchema); err != nil {
			t.Fatalf("node %d: %v", n.ID(), err)
		}
	}

	s := &soak{
		c:          c,
		tracer:     &soakTracer{failed: make(map[int64][]int), events: make(map[int64][]string)},
		errClasses: make(map[string]int),
		faults:     make(map[string]int),
		unsettled:  make(map[int]time.Time),
		ctxErrs:    make(map[int64]string),
	}
	baseGoroutines := soakGoroutines()
	baseHeap := soakHeap()

	cfg, err := clusterpool.ParseConfig(c.DSN() + fmt.Sprintf(
		"&cluster_probe_interval=500ms&cluster_balance_interval=1s&pool_max_conns=%d&pool_min_conns=4", soakMaxConns))
	if err != nil {
		t.Fatal(err)
	}
	cfg.Tracer = s.tracer
	s.pool, err = clusterpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	poolClosed := false
	defer func() {
		if !poolClosed {
			s.pool.Close()
		}
		if t.Failed() {
			s.mu.Lock()
			t.Logf("soak: fault log (seed=%d):\n\t%s", seed, strings.Join(s.faultLog, "\n\t"))
			s.mu.Unlock()
		}
	}()

	s.start = time.Now()
	s.tracer.start = s.start
	stop := make(chan struct{})
	var load, bg sync.WaitGroup
	for w := range soakWorkers {
		load.Go(func() { s.worker(w, rand.New(rand.NewPCG(uint64(seed), uint64(w)+1)), stop) })
	}
	samplerStop := make(chan struct{})
	bg.Go(func() { s.sample(samplerStop) })
	faultsDone := make(chan struct{})
	go func() {
		defer close(faultsDone)
		s.faultLoop(rand.New(rand.NewPCG(uint64(seed), 0)), stop)
	}()

	time.Sleep(dur)
	// A short or slow run may end before every kind of fault has come up:
	// the load goes on until each has, so that the floor on faults is met
	// by waiting for it, not by luck.
	if missing := s.waitFaultKinds(soakStepTimeout); len(missing) > 0 {
		s.violation("%v past the load's %v, still no fault of kind %v injected", soakStepTimeout, dur, missing)
	}
	close(stop)
	<-faultsDone
	load.Wait()
	elapsed := time.Since(s.start)
	s.healAll()
	close(samplerStop)
	bg.Wait()

	// Quiet: faults healed, every node Up, no load.
	s.waitQuiet()
	ops, writes := 0, 0
	for w := range soakWorkers {
		ops += len(s.records[w])
		for _, r := range s.records[w] {
			if r.op.write() {
				writes++
			}
		}
	}
	cs := s.pool.ClusterStat()
	retries, evictions := cs.RetryAttempts(), cs.Evictions()
	s.pool.Close()
	poolClosed = true
	s.checkGoroutines(baseGoroutines)
	applied := s.checkWrites()
	heap := s.checkHeap(baseHeap)

	s.mu.Lock()
	defer s.mu.Unlock()
	for _, v := range s.violations[:min(len(s.violations), 30)] {
		t.Error(v)
	}
	if len(s.violations) > 30 {
		t.Errorf("... and %d more violations", len(s.violations)-30)
	}
	if len(s.errSamples) > 0 {
		t.Logf("soak: sample errors:\n\t%s", strings.Join(s.errSamples, "\n\t"))
	}
	if minOps := int(soakMinOpsPerSec * dur.Seconds()); ops < minOps {
		t.Errorf("soak: %d operations in %v, want at least %d (%d/s)", ops, elapsed.Round(time.Millisecond), minOps, soakMinOpsPerSec)
	}
	if float64(applied.acked) < soakMinAckedFrac*float64(writes) {
		t.Errorf("soak: %d of %d writes acknowledged, want at least %.0f%%", applied.acked, writes, 100*soakMinAckedFrac)
	}
	for _, kind := range soakFaultKinds {
		if s.faults[kind] == 0 {
			t.Errorf("soak: no %s fault injected", kind)
		}
	}
	for _, class := range slices.Sorted(maps.Keys(s.errClasses)) {
		if n := s.errClasses[class]; n > 0 && !soakAllowedClass(class) {
			t.Errorf("soak: callers saw %d errors of class %s; the README allows only outcome-unknown and the callers' deadlines", n, class)
		}
	}
	t.Logf("soak: retries %d, evictions %d, heap %d MiB -> %d MiB, goroutines %d -> %d (cluster's included)",
		retries, evictions, baseHeap>>20, heap>>20, len(baseGoroutines), runtime.NumGoroutine())
	t.Log(s.summaryLocked(seed, dur, elapsed, ops, applied))
}

// summaryLocked is the one line the README quotes.
func (s *soak) summaryLocked(seed int64, dur, elapsed time.Duration, ops int, a soakApplied) string {
	var b strings.Builder
	fmt.Fprintf(&b, "soak: seed=%d %d nodes %v: %d ops (%.0f/s), ", seed, soakNodes, dur, ops, float64(ops)/elapsed.Seconds())
	total := 0
	var fs []string
	for _, k := range soakFaultKinds {
		total += s.faults[k]
		fs = append(fs, fmt.Sprintf("%s %d", k, s.faults[k]))
	}
	fmt.Fprintf(&b, "%d faults (%s), errors:", total, strings.Join(fs, " "))
	classes := []string{"outcome-unknown", "canceled", "late", "connection", "not-sent", "restart-txn", "ambiguous", "permanent", "fresh-node"}
	for k := range s.errClasses {
		if !slices.Contains(classes, k) {
			classes = append(classes, k)
		}
	}
	for _, k := range classes {
		fmt.Fprintf(&b, " %s %d", k, s.errClasses[k])
	}
	fmt.Fprintf(&b, "; acknowledged writes %d ", a.acked)
	if len(s.violations) == 0 {
		b.WriteString("all present once")
	} else {
		fmt.Fprintf(&b, "with %d VIOLATIONS", len(s.violations))
	}
	fmt.Fprintf(&b, " (outcome unknown and applied %d, idempotent on 2 nodes %d); max conns %d/%d (servers %d)",
		a.unknownHit, a.crossNode, s.maxPool.Load(), soakMaxConns, s.maxServers.Load())
	return b.String()
}

// worker runs operations until stop is closed. Each has its own 2–5 s
// deadline, so a partitioned node cannot hang it, and stopping the load
// never cancels an operation in flight.
func (s *soak) worker(w int, rng *rand.Rand, stop <-chan struct{}) {
	for seq := 0; ; seq++ {
		select {
		case <-stop:
			return
		default:
		}
		op := soakMix[rng.IntN(len(soakMix))]
		id := soakOpID(w, seq)
		timeout := 2*time.Second + soakRand(rng, 3*time.Second)
		ctx, cancel := context.WithTimeout(context.WithValue(context.Background(), opIDKey{}, id), timeout)
		s.records[w] = append(s.records[w], soakRecord{op: op})
		started := time.Now()
		err, late := s.run(ctx, op, id, rng)
		cancel()
		s.records[w][seq].res = s.result(op, id, err, late, started)
	}
}

// run runs one operation; late is set when a batch failed after its first
// result, or a Query after its first row, reached the caller, which the
// pool leaves to the caller.
func (s *soak) run(ctx context.Context, op soakOp, id int64, rng *rand.Rand) (err error, late bool) {
	p := s.pool
	switch op {
	case soakInsert:
		_, err = p.Exec(ctx, "INSERT INTO soak_ni (op) VALUES ($1)", id)
	case soakInsertSQL:
		_, err = p.Exec(ctx, fmt.Sprintf("INSERT INTO soak_ni (op) VALUES (%d)", id))
	case soakUpsert:
		_, err = p.Exec(clusterpool.WithIdempotent(ctx), "INSERT INTO soak_idem (op) VALUES ($1) ON CONFLICT DO NOTHING", id)
	case soakTx:
		err = p.BeginFunc(ctx, func(tx pgx.Tx) error {
			for part := range 2 {
				if _, err := tx.Exec(ctx, "INSERT INTO soak_tx (op, part) VALUES ($1, $2)", id, part); err != nil {
					return err
				}
			}
			return nil
		})
	case soakBatch:
		b := &pgx.Batch{}
		b.Queue("INSERT INTO soak_batch (op, part) VALUES ($1, 0)", id)
		b.Queue("INSERT INTO soak_batch (op, part) VALUES ($1, 1)", id)
		br := p.SendBatch(ctx, b)
		if _, err = br.Exec(); err != nil {
			br.Close()
			return err, false
		}
		_, err = br.Exec()
		err = errors.Join(err, br.Close())
		return err, err != nil
	case soakGet:
		var got int64
		err = p.QueryRow(ctx, "SELECT op FROM soak_idem WHERE op = $1", id-int64(rng.IntN(50))).Scan(&got)
		if errors.Is(err, pgx.ErrNoRows) {
			err = nil
		}
	case soakScan:
		var rows pgx.Rows
		rows, err = p.Query(ctx, "SELECT op FROM soak_ni WHERE op >= $1 ORDER BY op LIMIT 5", id-int64(rng.IntN(50)))
		if err == nil {
			n := 0
			for rows.Next() {
				n++
			}
			if err = rows.Err(); err != nil {
				return err, n > 0
			}
		}
	}
	return err, false
}

// result classifies an operation's error and counts it.
func (s *soak) result(op soakOp, id int64, err error, late bool, started time.Time) soakResult {
	if err == nil {
		return resAcked
	}
	class := clusterpool.Classify(err).String()
	res := resFailed
	switch {
	case errors.Is(err, clusterpool.ErrOutcomeUnknown):
		class, res = "outcome-unknown", resUnknown
	case errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled):
		res = resContext
	case late:
		class, res = "late", resLate
	case soakUndefinedTable(err):
		// The load balancer routes to a new node as soon as AddNode
		// returns; the fault loop kills it at once and creates the tables
		// before restarting it, so this can only happen inside that gap.
		if s.duringAdd(started) {
			class, res = "fresh-node", resFresh
		} else {
			s.violation("%s started %v after the last node's tables existed, yet: %v", op, time.Since(s.start).Round(time.Millisecond), err)
		}
	}
	s.mu.Lock()
	if res == resContext && op.write() && len(s.ctxErrs) < 1000 {
		s.ctxErrs[id] = err.Error()
	}
	s.errClasses[class]++
	if (res == resFailed || !soakAllowedClass(class)) && len(s.errSamples) < 10 {
		s.errSamples = append(s.errSamples, fmt.Sprintf("%v %s (%s): %v", time.Since(s.start).Round(time.Millisecond), op, class, err))
	}
	s.mu.Unlock()
	return res
}

func soakUndefinedTable(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "42P01"
}

// duringAdd reports whether an operation started at started (and ending now)
// overlaps the gap between an AddNode call and its node's tables existing.
func (s *soak) duringAdd(started time.Time) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, w := range s.addWindows {
		if started.Before(w[1]) || w[1].IsZero() {
			return true
		}
	}
	return false
}

func (s *soak) violation(format string, args ...any) {
	s.mu.Lock()
	s.violations = append(s.violations, fmt.Sprintf(format, args...))
	s.mu.Unlock()
}

func (s *soak) logFault(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	s.mu.Lock()
	s.faultLog = append(s.faultLog, fmt.Sprintf("%8v %s", time.Since(s.start).Round(time.Millisecond), msg))
	s.mu.Unlock()
}

// waitFaultKinds waits up to d for every kind of fault to have been
// injected, and returns the kinds still missing.
func (s *soak) waitFaultKinds(d time.Duration) (missing []string) {
	deadline := time.Now().Add(d)
	for {
		missing = missing[:0]
		s.mu.Lock()
		for _, kind := range soakFaultKinds {
			if s.faults[kind] == 0 {
				missing = append(missing, kind)
			}
		}
		s.mu.Unlock()
		if len(missing) == 0 || time.Now().After(deadline) {
			return missing
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (s *soak) countFault(kind string) {
	s.mu.Lock()
	s.faults[kind]++
	s.mu.Unlock()
}

// sample checks, every 10 ms, that the pool holds at most MaxConns
// connections, and that the servers do not see more than that (plus the
// probe's) for longer than it takes a destroyed connection to close.
func (s *soak) sample(stop <-chan struct{}) {
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	var excessSince time.Time
	for {
		select {
		case <-stop:
			return
		case <-tick.C:
		}
		total := int64(s.pool.Stat().TotalConns())
		if total > s.maxPool.Load() {
			s.maxPool.Store(total)
		}
		if total > soakMaxConns {
			s.violation("pool holds %d connections, MaxConns is %d", total, soakMaxConns)
		}
		now := time.Now()
		s.mu.Lock()
		skip := maps.Clone(s.unsettled)
		s.mu.Unlock()
		open := s.c.OpenConns()
		servers := 0
		for id, n := range open {
			if until, ok := skip[id]; ok && now.Before(until) {
				continue
			}
			servers += n
		}
		if int64(servers) > s.maxServers.Load() {
			s.maxServers.Store(int64(servers))
		}
		switch {
		case servers <= soakMaxConns+soakProbeConns:
			excessSince = time.Time{}
		case excessSince.IsZero():
			excessSince = now
		case now.Sub(excessSince) > soakExcessGrace:
			s.violation("servers have seen more than %d connections for %v: %v (pool: %d)",
				soakMaxConns+soakProbeConns, soakExcessGrace, open, total)
			excessSince = time.Time{}
		}
	}
}

// soakNodeState is the fault loop's view of one node.
type soakNodeState struct {
	n     *clustertest.Node
	fault string // "", "drain", "kill", "partition" or "latency"
	until time.Time
}

// faultLoop injects a random fault every 0.2–1.2 s or so, and heals each
// after a random while, keeping at most soakMaxFaulted nodes faulted and at
// least soakMinHealthy without a fault.
func (s *soak) faultLoop(rng *rand.Rand, stop <-chan struct{}) {
	nodes := make(map[int]*soakNodeState)
	for _, n := range s.c.Nodes() {
		nodes[n.ID()] = &soakNodeState{n: n}
	}
	s.nodes = nodes
	for {
		select {
		case <-stop:
			return
		case <-time.After(200*time.Millisecond + soakRand(rng, time.Second)):
		}
		now := time.Now()
		for _, id := range slices.Sorted(maps.Keys(nodes)) {
			if st := nodes[id]; st.fault != "" && now.After(st.until) {
				s.heal(st)
			}
		}
		if rng.Float64() < 0.7 {
			s.inject(rng, nodes)
		}
	}
}

// inject starts one fault that the limits allow, if any.
func (s *soak) inject(rng *rand.Rand, nodes map[int]*soakNodeState) {
	var healthy []*soakNodeState
	faulted := 0
	for _, id := range slices.Sorted(maps.Keys(nodes)) {
		if nodes[id].fault == "" {
			healthy = append(healthy, nodes[id])
		} else {
			faulted++
		}
	}
	kinds := []string{"drain", "kill", "partition", "latency", "add", "remove"}
	rng.Shuffle(len(kinds), func(i, j int) { kinds[i], kinds[j] = kinds[j], kinds[i] })
	// The least injected kind first, so that even a short run has them all.
	s.mu.Lock()
	slices.SortStableFunc(kinds, func(a, b string) int { return s.faults[a] - s.faults[b] })
	s.mu.Unlock()
	if len(nodes) < soakNodes && rng.IntN(2) == 0 {
		kinds = append([]string{"add"}, kinds...)
	}
	if faulted >= soakMaxFaulted {
		return
	}
	for _, kind := range kinds {
		switch kind {
		case "add":
			if len(nodes) >= soakMaxNodes {
				continue
			}
			s.addNode(nodes)
			return
		case "remove":
			if len(nodes) <= soakMinNodes || len(healthy)-1 < soakMinHealthy {
				continue
			}
			s.removeNode(rng, nodes, healthy[rng.IntN(len(healthy))])
			return
		default:
			if len(healthy)-1 < soakMinHealthy {
				continue
			}
			s.fault(rng, kind, healthy[rng.IntN(len(healthy))])
			return
		}
	}
}

func (s *soak) stepCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), soakStepTimeout)
}

// fault starts a drain, kill, partition or latency on st's node.
func (s *soak) fault(rng *rand.Rand, kind string, st *soakNodeState) {
	n := st.n
	st.fault = kind
	switch kind {
	case "drain":
		wait := 100*time.Millisecond + soakRand(rng, 1500*time.Millisecond)
		s.logFault("node %d: drain (connection wait %v)", n.ID(), wait)
		ctx, cancel := s.stepCtx()
		if err := n.Drain(ctx, wait); err != nil {
			s.violation("clustertest: drain node %d: %v", n.ID(), err)
		}
		cancel()
		st.until = time.Now().Add(500*time.Millisecond + soakRand(rng, 2*time.Second))
	case "kill":
		s.logFault("node %d: kill", n.ID())
		n.Kill()
		st.until = time.Now().Add(500*time.Millisecond + soakRand(rng, 2500*time.Millisecond))
	case "partition":
		s.logFault("node %d: partition", n.ID())
		s.mu.Lock()
		s.unsettled[n.ID()] = time.Now().Add(24 * time.Hour)
		s.mu.Unlock()
		n.Partition()
		st.until = time.Now().Add(500*time.Millisecond + soakRand(rng, 2500*time.Millisecond))
	case "latency":
		d := 10*time.Millisecond + soakRand(rng, 290*time.Millisecond)
		s.logFault("node %d: latency %v", n.ID(), d)
		n.SetLatency(d)
		st.until = time.Now().Add(time.Second + soakRand(rng, 3*time.Second))
	}
	s.countFault(kind)
}

// heal ends st's fault: a drained or killed node restarts.
func (s *soak) heal(st *soakNodeState) {
	n := st.n
	switch st.fault {
	case "drain", "kill":
		s.logFault("node %d: restart", n.ID())
		ctx, cancel := s.stepCtx()
		if err := n.Restart(ctx); err != nil {
			s.violation("clustertest: restart node %d: %v", n.ID(), err)
		}
		cancel()
		s.countFault("restart")
	case "partition":
		s.logFault("node %d: heal", n.ID())
		n.Heal()
		s.mu.Lock()
		s.unsettled[n.ID()] = time.Now().Add(soakHealGrace)
		s.mu.Unlock()
	case "latency":
		s.logFault("node %d: latency off", n.ID())
		n.SetLatency(0)
	}
	st.fault = ""
}

// addNode adds a node. The load balancer routes to it as soon as AddNode
// returns, before its tables exist, so it is killed at once, given its
// tables straight through its server, and restarted.
func (s *soak) addNode(nodes map[int]*soakNodeState) {
	ctx, cancel := s.stepCtx()
	defer cancel()
	s.mu.Lock()
	s.addWindows = append(s.addWindows, [2]time.Time{time.Now()})
	win := len(s.addWindows) - 1
	s.mu.Unlock()
	n, err := s.c.AddNode(ctx)
	if err != nil {
		s.violation("clustertest: AddNode: %v", err)
		s.mu.Lock()
		s.addWindows[win][1] = time.Now()
		s.mu.Unlock()
		return
	}
	n.Kill()
	s.logFault("node %d: added", n.ID())
	s.countFault("add")
	err = n.ExecDirect(ctx, soakSchema)
	s.mu.Lock()
	s.addWindows[win][1] = time.Now()
	s.mu.Unlock()
	if err != nil {
		s.violation("node %d: create tables: %v", n.ID(), err)
	}
	if err := n.Restart(ctx); err != nil {
		s.violation("clustertest: restart new node %d: %v", n.ID(), err)
	}
	nodes[n.ID()] = &soakNodeState{n: n}
}

// removeNode takes a node out for good: drained or killed first so that no
// write lands on it after its rows are read, then read, then removed.
func (s *soak) removeNode(rng *rand.Rand, nodes map[int]*soakNodeState, st *soakNodeState) {
	n := st.n
	ctx, cancel := s.stepCtx()
	defer cancel()
	if rng.IntN(2) == 0 {
		wait := 100*time.Millisecond + soakRand(rng, time.Second)
		s.logFault("node %d: remove (drain, connection wait %v)", n.ID(), wait)
		if err := n.Drain(ctx, wait); err != nil {
			s.violation("clustertest: drain node %d: %v", n.ID(), err)
		}
	} else {
		s.logFault("node %d: remove (kill)", n.ID())
		n.Kill()
	}
	tally, err := soakReadNode(ctx, n)
	if err != nil {
		s.violation("node %d: read rows before removing it: %v", n.ID(), err)
	}
	s.mu.Lock()
	s.removed = append(s.removed, tally)
	s.mu.Unlock()
	if err := s.c.RemoveNode(ctx, n.ID()); err != nil {
		s.violation("clustertest: RemoveNode %d: %v", n.ID(), err)
	}
	delete(nodes, n.ID())
	s.countFault("remove")
}

// healAll ends every fault once the load has stopped.
func (s *soak) healAll() {
	for _, id := range slices.Sorted(maps.Keys(s.nodes)) {
		if st := s.nodes[id]; st.fault != "" {
			s.heal(st)
		}
	}
	s.mu.Lock()
	clear(s.unsettled)
	s.mu.Unlock()
}

// waitQuiet waits, with a generous deadline, until the pool's per-node counts
// equal what the servers see.
func (s *soak) waitQuiet() {
	deadline := time.Now().Add(soakQuietTimeout)
	for {
		pool := make(map[int]int)
		for _, st := range s.pool.NodeStats() {
			if st.TotalConns > 0 {
				pool[int(st.ID)] = int(st.TotalConns)
			}
		}
		servers := s.c.OpenConns()
		maps.DeleteFunc(servers, func(_, n int) bool { return n == 0 })
		if maps.Equal(pool, servers) {
			return
		}
		if time.Now().After(deadline) {
			s.violation("once quiet, the pool's counts %v never matched the servers' %v within %v (stats %+v)",
				pool, servers, soakQuietTimeout, s.pool.NodeStats())
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// soakTally is the rows found on the nodes' databases.
type soakTally struct {
	single map[int64]int      // soak_ni: op -> rows
	idem   map[int64][]int    // soak_idem: op -> nodes holding it
	pairs  map[int64][][2]int // soak_tx and soak_batch: op -> (node, part) per row
	tables map[int64]string   // pairs: op -> its table, to catch a row in the wrong one
}

func newSoakTally() *soakTally {
	return &soakTally{
		single: make(map[int64]int),
		idem:   make(map[int64][]int),
		pairs:  make(map[int64][][2]int),
		tables: make(map[int64]string),
	}
}

func (t *soakTally) merge(o *soakTally) {
	for id, n := range o.single {
		t.single[id] += n
	}
	for id, nodes := range o.idem {
		t.idem[id] = append(t.idem[id], nodes...)
	}
	for id, rows := range o.pairs {
		t.pairs[id] = append(t.pairs[id], rows...)
		t.tables[id] = o.tables[id]
	}
}

// soakReadNode reads a node's rows straight from its server, once no client
// backend is left on it: a statement sent just before the proxy went down
// may still be running, and may still commit.
func soakReadNode(ctx context.Context, n *clustertest.Node) (*soakTally, error) {
	conn, err := pgx.Connect(ctx, n.PostgresDSN())
	if err != nil {
		return nil, err
	}
	defer conn.Close(context.Background())
	for {
		var others int
		if err := conn.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity
			WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()`).Scan(&others); err != nil {
			return nil, err
		}
		if others == 0 {
			break
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("%d client backends still on the server: %w", others, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
	t := newSoakTally()
	id := n.ID()
	var op int64
	var part int
	rows, _ := conn.Query(ctx, "SELECT op FROM soak_ni")
	if _, err := pgx.ForEachRow(rows, []any{&op}, func() error {
		t.single[op]++
		return nil
	}); err != nil {
		return nil, fmt.Errorf("soak_ni: %w", err)
	}
	rows, _ = conn.Query(ctx, "SELECT op FROM soak_idem")
	if _, err := pgx.ForEachRow(rows, []any{&op}, func() error {
		t.idem[op] = append(t.idem[op], id)
		return nil
	}); err != nil {
		return nil, fmt.Errorf("soak_idem: %w", err)
	}
	for _, table := range []string{"soak_tx", "soak_batch"} {
		rows, _ = conn.Query(ctx, "SELECT op, part FROM "+table)
		if _, err := pgx.ForEachRow(rows, []any{&op, &part}, func() error {
			t.pairs[op] = append(t.pairs[op], [2]int{id, part})
			t.tables[op] = table
			return nil
		}); err != nil {
			return nil, fmt.Errorf("%s: %w", table, err)
		}
	}
	return t, nil
}

// soakApplied is what checkWrites found, for the summary.
type soakApplied struct {
	acked      int // acknowledged writes, all checked
	crossNode  int // idempotent writes on two nodes after a retry
	unknownHit int // writes whose outcome was unknown and that were applied
}

// checkWrites reads every node's rows (and those read from removed nodes)
// and checks each write against what its caller was told.
func (s *soak) checkWrites() soakApplied {
	ctx, cancel := context.WithTimeout(context.Background(), soakQuietTimeout)
	defer cancel()
	all := newSoakTally()
	s.mu.Lock()
	removed := slices.Clone(s.removed)
	s.mu.Unlock()
	for _, t := range removed {
		if t != nil {
			all.merge(t)
		}
	}
	s.mu.Lock()
	s.removed = nil // the heap check comes next
	s.mu.Unlock()
	for _, n := range s.c.Nodes() {
		t, err := soakReadNode(ctx, n)
		if err != nil {
			s.violation("node %d: read rows: %v", n.ID(), err)
			continue
		}
		all.merge(t)
	}
	s.tracer.mu.Lock()
	failedNodes := maps.Clone(s.tracer.failed)
	s.tracer.mu.Unlock()

	var a soakApplied
	for w := range soakWorkers {
		for seq, r := range s.records[w] {
			id := soakOpID(w, seq)
			var present bool
			switch r.op {
			case soakInsert, soakInsertSQL:
				n := all.single[id]
				delete(all.single, id)
				present = n > 0
				if n > 1 {
					s.violation("non-idempotent %s op %d applied %d times (caller saw %s); %s", r.op, id, n, r.res, s.tracer.explain(id))
				}
			case soakUpsert:
				nodes := all.idem[id]
				delete(all.idem, id)
				present = len(nodes) > 0
				if len(nodes) > 1 {
					a.crossNode++
				}
				// Each attempt that failed may have applied it on its
				// node; the attempt that succeeded on one more.
				var others []int
				for _, n := range nodes {
					if !slices.Contains(failedNodes[id], n) {
						others = append(others, n)
					}
				}
				if len(others) > 1 {
					s.violation("idempotent op %d applied on nodes %v, its failed attempts ran on %v (caller saw %s); %s", id, nodes, failedNodes[id], r.res, s.tracer.explain(id))
				}
			case soakTx, soakBatch:
				rows := all.pairs[id]
				table := all.tables[id]
				delete(all.pairs, id)
				delete(all.tables, id)
				present = len(rows) > 0
				want := map[soakOp]string{soakTx: "soak_tx", soakBatch: "soak_batch"}[r.op]
				whole := len(rows) == 0 || len(rows) == 2 && rows[0][0] == rows[1][0] && rows[0][1]+rows[1][1] == 1
				if !whole || present && table != want {
					s.violation("%s op %d: rows (node, part) %v in %s: not one transaction applied once (caller saw %s); %s", want, id, rows, table, r.res, s.tracer.explain(id))
				}
			default:
				continue
			}
			switch r.res {
			case resPending:
				s.violation("op %d never finished", id)
			case resAcked:
				a.acked++
				if !present {
					s.violation("acknowledged write op %d (%s) is missing; %s", id, r.op, s.tracer.explain(id))
				}
			case resFailed, resFresh:
				if present {
					s.violation("write op %d (%s) failed with a known outcome (%s) but was applied; %s", id, r.op, r.res, s.tracer.explain(id))
				}
			case resContext:
				// A write or COMMIT the deadline cut after it was sent
				// matches ErrOutcomeUnknown; this one was not sent, or its
				// transaction never reached COMMIT.
				if present {
					s.mu.Lock()
					msg := s.ctxErrs[id]
					s.mu.Unlock()
					s.violation("write op %d (%s) ended with its caller's deadline, not matching ErrOutcomeUnknown, but was applied: %s; %s", id, r.op, msg, s.tracer.explain(id))
				}
			case resUnknown, resLate:
				if present {
					a.unknownHit++
				}
			}
		}
	}
	for id, n := range all.single {
		s.violation("soak_ni has %d rows for op %d, which no INSERT wrote", n, id)
	}
	for id, nodes := range all.idem {
		s.violation("soak_idem has op %d on nodes %v, which no upsert wrote", id, nodes)
	}
	for id, rows := range all.pairs {
		s.violation("%s has rows %v for op %d, which no transaction or batch wrote", all.tables[id], rows, id)
	}
	return a
}

func (r soakResult) String() string {
	switch r {
	case resPending:
		return "pending"
	case resAcked:
		return "success"
	case resUnknown:
		return "outcome unknown"
	case resContext:
		return "its deadline"
	case resLate:
		return "an error after the first result or row"
	case resFailed:
		return "a known failure"
	case resFresh:
		return "42P01 on a new node"
	}
	return fmt.Sprintf("soakResult(%d)", uint8(r))
}

// soakGoroutines returns every goroutine's stack by goroutine ID.
func soakGoroutines() map[string]string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	m := make(map[string]string)
	for _, g := range strings.Split(string(buf), "\n\n") {
		if rest, ok := strings.CutPrefix(g, "goroutine "); ok {
			id, _, _ := strings.Cut(rest, " ")
			m[id] = g
		}
	}
	return m
}

// checkGoroutines waits until every goroutine started since base has exited,
// except clustertest's own (the cluster lives on until the test ends, and
// nodes added during the soak have their own goroutines).
func (s *soak) checkGoroutines(base map[string]string) {
	deadline := time.Now().Add(soakQuietTimeout)
	for {
		var left []string
		for id, stack := range soakGoroutines() {
			if _, ok := base[id]; !ok && !strings.Contains(stack, "/clustertest.") {
				left = append(left, stack)
			}
		}
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			s.violation("%d goroutines left after Close:\n%s", len(left), strings.Join(left, "\n\n"))
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func soakHeap() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// checkHeap waits until the live heap is back within soakHeapSlack of base,
// plus what the test itself still holds (its per-operation records).
func (s *soak) checkHeap(base uint64) (now uint64) {
	var records uint64
	for w := range soakWorkers {
		records += uint64(cap(s.records[w])) * uint64(unsafe.Sizeof(soakRecord{}))
	}
	limit := base + soakHeapSlack + records
	deadline := time.Now().Add(soakQuietTimeout)
	for {
		now = soakHeap()
		if now <= limit {
			return now
		}
		if time.Now().After(deadline) {
			s.violation("heap %d MiB after Close, baseline %d MiB + %d MiB slack + %d MiB of records",
				now>>20, base>>20, soakHeapSlack>>20, records>>20)
			return now
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// soakRand returns a random duration in [0, d).
func soakRand(rng *rand.Rand, d time.Duration) time.Duration {
	return time.Duration(rng.Int64N(int64(d)))
}
