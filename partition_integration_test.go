package clusterpool

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/clusterpool/clusterpool/clustertest"
)

// partitionParams keep the partition tests short: probes and balancing
// rounds every 200 ms, connects and health checks bounded by 2 s, and
// pgxpool refilling MinConns every 500 ms rather than every minute.
const partitionParams = "cluster_probe_interval=200ms&cluster_balance_interval=200ms" +
	"&connect_timeout=2&pool_min_conns=6&pool_max_conns=6&pool_health_check_period=500ms"

// partitionCallTimeout is each test call's own deadline. It is generous for
// a loaded machine; a call on a partitioned node waits it out.
const partitionCallTimeout = time.Second

// movedCallTimeout is each call's deadline once the partitioned node is
// evicted: long enough that only a call waiting on that node can reach it.
const movedCallTimeout = 10 * time.Second

// TestPartition: a node that stops answering (its proxy holds every byte
// both ways, and the load balancer keeps routing to it) costs callers no
// more than their own deadlines; the node is checked, evicted, traffic
// moves to the other nodes, and after Heal the node is used again. Behind
// the single load-balancer address and with the hosts listed; plus the
// probe with every node partitioned, a healthy node under callers'
// timeouts, and the outcome of writes cut by the caller's deadline.
func TestPartition(t *testing.T) {
	t.Parallel()
	c := newKVCluster(t, 3)
	t.Run("LoadBalancer", func(t *testing.T) { testPartitionNode(t, c, c.DSN(), nil) })
	t.Run("Hosts", func(t *testing.T) { testPartitionNode(t, c, c.HostsDSN(), nil) })
	// Every acquire pings (as pgxpool does for connections idle over a
	// second, i.e. under light load): calls hang in the ping, before any
	// statement, where the acquire's error names no node.
	t.Run("AcquirePing", func(t *testing.T) {
		testPartitionNode(t, c, c.DSN(), func(cfg *Config) {
			cfg.ShouldPing = func(context.Context, pgxpool.ShouldPingParams) bool { return true }
		})
	})
	t.Run("HostsConnect", func(t *testing.T) { testPartitionConnect(t, c) })
	t.Run("SlowQueriesDoNotEvict", func(t *testing.T) { testPartitionSlowQueries(t, c) })
	t.Run("ProbeBounded", func(t *testing.T) { testPartitionProbeBounded(t, c) })
	t.Run("OutcomeUnknownOnDeadline", func(t *testing.T) { testOutcomeUnknownOnDeadline(t, c) })
}

// partitionLoad runs workers calls in a loop, each with its own deadline,
// counting successes and deadline errors; any other error fails the test.
type partitionLoad struct {
	ok, timeouts atomic.Int64
	stop         chan struct{}
	wg           sync.WaitGroup
}

func startPartitionLoad(t *testing.T, p *Pool, workers int) *partitionLoad {
	return startPartitionLoadWithin(t, p, workers, partitionCallTimeout)
}

// startPartitionLoadWithin is startPartitionLoad with each call's deadline
// callTimeout.
func startPartitionLoadWithin(t *testing.T, p *Pool, workers int, callTimeout time.Duration) *partitionLoad {
	l := &partitionLoad{stop: make(chan struct{})}
	for range workers {
		l.wg.Go(func() {
			for {
				select {
				case <-l.stop:
					return
				default:
				}
				ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
				var one int
				err := p.QueryRow(ctx, "SELECT 1").Scan(&one)
				cancel()
				switch {
				case err == nil:
					l.ok.Add(1)
				case errors.Is(err, context.DeadlineExceeded):
					l.timeouts.Add(1)
				default:
					t.Errorf("call failed with something other than its deadline: %v", err)
				}
			}
		})
	}
	return l
}

func (l *partitionLoad) halt() {
	close(l.stop)
	l.wg.Wait()
}

func nodeStat(p *Pool, id int) (NodeStat, bool) {
	for _, s := range p.NodeStats() {
		if int(s.ID) == id {
			return s, true
		}
	}
	return NodeStat{}, false
}

// testPartitionNode partitions one of the three nodes, each holding two of
// the pool's six connections, under load from six workers (so calls are in
// flight on the node when it stops answering); once it is evicted, three
// workers (fewer than the connections the other two nodes hold, so no call
// needs a new connection, which behind the load balancer may land on the
// partitioned node and wait out its deadline) show where traffic goes.
func testPartitionNode(t *testing.T, c *clustertest.Cluster, dsn string, mutate func(*Config)) {
	p := startPool(t, dsn+"&"+partitionParams, mutate)
	waitCond(t, func() string {
		if counts := poolCounts(p); len(counts) != 3 || counts[1] != 2 || counts[2] != 2 || counts[3] != 2 {
			return fmt.Sprintf("pool not spread 2/2/2 yet: %v", counts)
		}
		return ""
	})
	const victim = 2
	n := c.Node(victim)
	load := startPartitionLoad(t, p, 6)
	defer func() {
		n.Heal()
		if load != nil {
			load.halt()
		}
	}()
	waitCond(t, func() string {
		if load.ok.Load() < 20 {
			return "load not running yet"
		}
		return ""
	})

	n.Partition()
	waitCond(t, func() string {
		s, ok := nodeStat(p, victim)
		if !ok || s.Healthy {
			return fmt.Sprintf("node %d not evicted: %+v (known %v; calls ok %d, timed out %d)", victim, s, ok, load.ok.Load(), load.timeouts.Load())
		}
		return ""
	})
	waitCond(t, func() string {
		if s, _ := nodeStat(p, victim); s.TotalConns != 0 {
			return fmt.Sprintf("node %d still holds connections: %+v", victim, s)
		}
		return ""
	})
	if load.timeouts.Load() == 0 {
		t.Error("no call timed out on the partitioned node; the test tested nothing")
	}
	if s, _ := nodeStat(p, victim); s.Evictions == 0 {
		t.Errorf("node %d unhealthy without an eviction: %+v", victim, s)
	}

	timedOut := load.timeouts.Load()
	load.halt()

	// Traffic has moved: calls succeed on the other nodes, and none waits
	// on the partitioned node. Each call now has a deadline far beyond what
	// a loaded machine needs for SELECT 1, so a call that times out is one
	// that reached the partitioned node, not a slow one.
	load = startPartitionLoadWithin(t, p, 3, movedCallTimeout)
	waitCond(t, func() string {
		if got := load.ok.Load(); got < 100 {
			return fmt.Sprintf("%d calls succeeded since the node left", got)
		}
		return ""
	})
	okMoved, toMoved := load.ok.Load(), load.timeouts.Load()
	if toMoved != 0 {
		t.Errorf("after the eviction %d calls timed out (with a %v deadline) and %d succeeded", toMoved, movedCallTimeout, okMoved)
	}

	n.Heal()
	waitCond(t, func() string {
		s, _ := nodeStat(p, victim)
		if !s.Healthy || s.TotalConns == 0 {
			return fmt.Sprintf("node %d not back in use after Heal: %+v; pool %v", victim, s, poolCounts(p))
		}
		return ""
	})
	t.Logf("partitioned node %d evicted (%d calls timed out); then %d calls ok, %d timed out; back in use after Heal; pool %v, ClusterStat probes %d failed %d",
		victim, timedOut, okMoved, toMoved, poolCounts(p), p.ClusterStat().Probes(), p.ClusterStat().ProbeFailures())
}

// testPartitionConnect: with the hosts listed and no call or probe on the
// partitioned node, a pool connect placed on it times out (connect_timeout)
// and fails over to another host; that failover gets the node checked (a
// dial of its address, which hangs too) and evicted, and the pool refills
// on the other nodes.
func testPartitionConnect(t *testing.T, c *clustertest.Cluster) {
	p := startPool(t, c.HostsDSN()+"&cluster_probe_interval=1h&cluster_balance_interval=200ms"+
		"&connect_timeout=2&pool_min_conns=6&pool_max_conns=6&pool_health_check_period=500ms", nil)
	waitCond(t, func() string {
		if counts := poolCounts(p); len(counts) != 3 || counts[1] != 2 || counts[2] != 2 || counts[3] != 2 {
			return fmt.Sprintf("pool not spread 2/2/2 yet: %v", counts)
		}
		return ""
	})
	const victim = 3
	n := c.Node(victim)
	n.Partition()
	defer n.Heal()
	p.Reset() // every connection closes; the refill places two on the victim first
	waitCond(t, func() string {
		s, ok := nodeStat(p, victim)
		if !ok || s.Healthy {
			return fmt.Sprintf("node %d not evicted: %+v (known %v); pool %v", victim, s, ok, poolCounts(p))
		}
		return ""
	})
	waitCond(t, func() string {
		if counts := poolCounts(p); counts[victim] != 0 || counts[1]+counts[2] != 6 {
			return fmt.Sprintf("pool not refilled on the other nodes: %v", counts)
		}
		return ""
	})
}

// testPartitionSlowQueries: slow queries cut by their callers' short
// deadlines, two at a time (so both of a node's connections may be cut at
// once), get their nodes checked while other work goes on, and the checks
// find the nodes answering: no node is evicted.
func testPartitionSlowQueries(t *testing.T, c *clustertest.Cluster) {
	p := startPool(t, c.DSN()+"&"+partitionParams, nil)
	waitCond(t, func() string {
		if counts := poolCounts(p); len(counts) != 3 || counts[1] != 2 || counts[2] != 2 || counts[3] != 2 {
			return fmt.Sprintf("pool not spread 2/2/2 yet: %v", counts)
		}
		return ""
	})
	load := startPartitionLoad(t, p, 1)
	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() {
			for range 5 {
				ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
				_, err := p.Exec(ctx, "SELECT pg_sleep(1)")
				cancel()
				if !errors.Is(err, context.DeadlineExceeded) || errors.Is(err, ErrOutcomeUnknown) {
					t.Errorf("slow read cut by its deadline: %v", err)
				}
			}
		})
	}
	wg.Wait()
	// Wait until some node has been checked and no check is running.
	waitCond(t, func() string {
		checked := 0
		for _, n := range p.tracker.nodeList() {
			if n.checking.Load() {
				return fmt.Sprintf("node %d still being checked", n.id)
			}
			if n.checkedAt.Load() != 0 {
				checked++
			}
		}
		if checked == 0 {
			return "no node checked yet"
		}
		return ""
	})
	load.halt()
	for _, s := range p.NodeStats() {
		if !s.Healthy || s.Evictions != 0 {
			t.Errorf("a healthy node was evicted after slow queries hit their deadlines: %+v", s)
		}
	}
}

// testPartitionProbeBounded: with every node partitioned, each probe ends
// by its own timeout (ProbeFailures grows), calls end by their deadlines,
// and the pool's background goroutines (balancer, probe, health checks)
// stop at once when asked. (pgxpool's Close itself may then wait up to
// 15 s: pgconn closes a connection cut by a deadline in the background,
// sending a CancelRequest that the partition holds.)
func testPartitionProbeBounded(t *testing.T, c *clustertest.Cluster) {
	r := &recorder{}
	p := startPool(t, c.DSN()+"&"+partitionParams, func(cfg *Config) { cfg.Tracer = r })
	defer func() {
		for _, n := range c.Nodes() {
			n.Heal()
		}
	}()
	waitCond(t, func() string {
		if counts := poolCounts(p); len(counts) == 0 || p.ClusterStat().Probes() == 0 {
			return "pool not connected and probed yet"
		}
		return ""
	})
	for _, n := range c.Nodes() {
		n.Partition()
	}
	// Each probe runs under one context with the probe's timeout,
	// min(ProbeInterval, 5 s) = 200 ms here. A probe that ignored it would
	// hang on the partitioned nodes for ever and no further probe would
	// start (the next is timed from the end of this one), so probes that
	// keep failing, each with its own context's deadline, are probes that
	// end by their timeout.
	failures, seen := p.ClusterStat().ProbeFailures(), len(eventsOf[TraceProbeData](r))
	waitCond(t, func() string {
		if got := p.ClusterStat().ProbeFailures() - failures; got < 3 {
			return fmt.Sprintf("%d probes failed since the partition", got)
		}
		return ""
	})
	for _, e := range eventsOf[TraceProbeData](r)[seen:] {
		if e.Err != nil && !errors.Is(e.Err, context.DeadlineExceeded) {
			t.Errorf("a probe with every node partitioned ended other than by its timeout: %v", e.Err)
		}
	}
	for range 3 {
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		_, err := p.Exec(ctx, "SELECT 1")
		cancel()
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("call with every node partitioned: %v", err)
		}
	}
	stopped := make(chan struct{})
	p.bgCancel()
	go func() {
		p.bgWG.Wait()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(condTimeout):
		t.Fatalf("background goroutines still running %v after they were stopped, with every node partitioned", condTimeout)
	}
	t.Logf("every node partitioned: %d probes failed, %d in all; nodes %+v",
		p.ClusterStat().ProbeFailures()-failures, p.ClusterStat().Probes(), p.NodeStats())
}

// testOutcomeUnknownOnDeadline: a write the caller's deadline cuts after it
// was sent may have been applied, so its error matches ErrOutcomeUnknown
// as well as the deadline; a read cut the same way, and work never sent,
// keep the plain context error.
func testOutcomeUnknownOnDeadline(t *testing.T, c *clustertest.Cluster) {
	p := startPool(t, c.DSN()+"&"+partitionParams, nil)
	if _, err := p.Exec(testCtx(t), "SELECT 1"); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	_, err := p.Exec(ctx, "INSERT INTO kv (k, v) SELECT 9001, 1 FROM pg_sleep(2)")
	cancel()
	var re *RetryError
	if !errors.Is(err, ErrOutcomeUnknown) || !errors.Is(err, context.DeadlineExceeded) || !errors.As(err, &re) || re.Attempts != 1 {
		t.Errorf("INSERT cut by its deadline: %v; want a 1-attempt *RetryError matching ErrOutcomeUnknown and context.DeadlineExceeded", err)
	} else {
		t.Logf("INSERT cut by its deadline: %v", err)
	}

	ctx, cancel = context.WithTimeout(context.Background(), 200*time.Millisecond)
	err = p.BeginFunc(ctx, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, "INSERT INTO kv (k, v) SELECT 9002, 1 FROM pg_sleep(2)")
		return err
	})
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) || errors.Is(err, ErrOutcomeUnknown) {
		t.Errorf("transaction cut before COMMIT (did not commit): %v; want the deadline, not ErrOutcomeUnknown", err)
	}

	ctx, cancel = context.WithTimeout(context.Background(), 200*time.Millisecond)
	_, err = p.Exec(ctx, "SELECT pg_sleep(2)")
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) || errors.Is(err, ErrOutcomeUnknown) || errors.As(err, &re) {
		t.Errorf("read cut by its deadline: %v; want the plain deadline error", err)
	}

	ctx, cancel = context.WithCancel(context.Background())
	cancel()
	_, err = p.Exec(ctx, "INSERT INTO kv (k, v) VALUES (9003, 1)")
	if !errors.Is(err, context.Canceled) || errors.Is(err, ErrOutcomeUnknown) {
		t.Errorf("write never sent: %v; want the plain context error", err)
	}
}
