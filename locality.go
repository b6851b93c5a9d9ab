package clusterpool

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Locality preference. With Config.Locality set, the pool keeps its
// connections on the nodes that share the most tiers of its own locality
// among the preference levels (the whole locality, then the fallback tiers,
// then the whole cluster), choosing the most preferred level that has a
// healthy node. Nodes outside that level are not eligible: they get no
// target, shed their connections at the balancer's pace, go last in host
// placement, and are refused behind one address like an over-target node.
// Gossip-learned hosts outside the level are not dialled at all.
//
// A node's locality comes from crdb_internal.gossip_nodes when the probe
// can read it, else from one SHOW LOCALITY on the first connection (or
// probe) that reaches the node: once per node, never per acquire.

// localityTier is one key=value tier of a locality.
type localityTier struct{ key, value string }

// parseLocality splits a locality in CockroachDB's --locality form
// ("region=us-east1,zone=us-east1-b") into its tiers, from the most to the
// least inclusive, or says what is wrong with it: each comma-separated tier
// is key=value with both sides non-empty, and keys are distinct. Spaces
// around tiers, keys and values are ignored.
func parseLocality(s string) ([]localityTier, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return nil, nil
	}
	var tiers []localityTier
	for _, tier := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(tier, "=")
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		if !ok || k == "" || v == "" || strings.Contains(v, "=") {
			return nil, fmt.Errorf("tier %q is not key=value", strings.TrimSpace(tier))
		}
		if slices.ContainsFunc(tiers, func(t localityTier) bool { return t.key == k }) {
			return nil, fmt.Errorf("key %q appears twice", k)
		}
		tiers = append(tiers, localityTier{k, v})
	}
	return tiers, nil
}

// localityPrefs are the pool's locality and its preference levels, fixed
// when the pool is created.
type localityPrefs struct {
	tiers []localityTier
	// levels holds, most preferred first, how many leading tiers a node
	// must share with tiers to be in each level: len(tiers) first, then
	// one entry per fallback tier, strictly decreasing. The whole cluster
	// (0) comes after them and is not listed.
	levels []int
}

// newLocalityPrefs returns the preferences for locality and the fallback
// tiers (nil: every shorter prefix, most specific first), or nil when
// locality is empty. Errors name the problem, not the setting: the caller
// does.
func newLocalityPrefs(locality string, fallback []string) (*localityPrefs, error) {
	tiers, err := parseLocality(locality)
	if err != nil {
		return nil, err
	}
	if len(tiers) == 0 {
		if len(fallback) > 0 {
			return nil, errors.New("a fallback needs a locality")
		}
		return nil, nil
	}
	lp := &localityPrefs{tiers: tiers, levels: []int{len(tiers)}}
	if fallback == nil {
		for k := len(tiers) - 1; k >= 1; k-- {
			lp.levels = append(lp.levels, k)
		}
		return lp, nil
	}
	for _, key := range fallback {
		key = strings.TrimSpace(key)
		i := slices.IndexFunc(tiers, func(t localityTier) bool { return t.key == key })
		switch {
		case i < 0:
			return nil, fmt.Errorf("%q is not a tier of the locality %q", key, locality)
		case i+1 >= lp.levels[len(lp.levels)-1]:
			return nil, fmt.Errorf("tier %q is not wider than the level before it: list tiers from the most to the least specific, without the locality's last one", key)
		}
		lp.levels = append(lp.levels, i+1)
	}
	return lp, nil
}

// shared returns how many leading tiers of the pool's locality a node with
// the given locality shares: the node has each of those keys with the same
// value, wherever it lists them.
func (lp *localityPrefs) shared(node []localityTier) int {
	k := 0
	for _, t := range lp.tiers {
		if !slices.Contains(node, t) {
			break
		}
		k++
	}
	return k
}

// levelName names the level that needs need shared tiers: the key of the
// last of them ("zone", "region"), or "" for the whole cluster.
func (lp *localityPrefs) levelName(need int) string {
	if lp == nil || need <= 0 || need > len(lp.tiers) {
		return ""
	}
	return lp.tiers[need-1].key
}

// preferredShare returns how many leading tiers of the pool's locality a
// node must share to be used: the entry of levels (most preferred first)
// for the first level that some healthy node reaches, given best, the most
// tiers any healthy node shares; 0 (the whole cluster) when no level is
// reached. It is the whole decision of which level the pool uses.
func preferredShare(levels []int, best int) int {
	for _, need := range levels {
		if best >= need {
			return need
		}
	}
	return 0
}

// nodeLocality is what the pool knows of a node's locality.
type nodeLocality struct {
	raw    string // as the node reports it
	shared int    // leading tiers shared with the pool's locality
}

// localityOf returns the node's locality, or nil while it is not known.
func (n *node) localityOf() *nodeLocality { return n.locality.Load() }

// setLocality records the node's locality, as reported by gossip or the
// node itself, and reports whether it changed. A malformed one is kept for
// NodeStat but shares nothing.
func (n *node) setLocality(raw string, lp *localityPrefs) bool {
	if cur := n.locality.Load(); cur != nil && cur.raw == raw {
		return false
	}
	nl := &nodeLocality{raw: raw}
	nl.setShared(lp)
	n.locality.Store(nl)
	return true
}

// setShared computes nl.shared for the pool's preferences (nil: none).
func (nl *nodeLocality) setShared(lp *localityPrefs) {
	if lp == nil {
		return
	}
	if tiers, err := parseLocality(nl.raw); err == nil {
		nl.shared = lp.shared(tiers)
	}
}

// localityScope says which nodes the pool uses now: those sharing need
// leading tiers of its locality; need 0 is every node.
type localityScope struct{ need int }

// in reports whether n is in scope. A node whose locality is not known is
// only in the whole cluster's scope.
func (s localityScope) in(n *node) bool {
	if s.need == 0 {
		return true
	}
	nl := n.localityOf()
	return nl != nil && nl.shared >= s.need
}

// inGossip is in for a node known only from gossip, by the locality gossip
// gave (nil: none).
func (s localityScope) inGossip(nl *nodeLocality) bool {
	return s.need == 0 || nl != nil && nl.shared >= s.need
}

// localityScope returns the scope of the most preferred level that has a
// live node among nodes, the tracker's: not evicted, not draining, and
// holding connections or seen within the refill window, so that the nodes
// of a level that went away without a word (its connections were idle when
// it drained, say) stop holding the pool there long before they expire. It
// costs a nil check without Config.Locality, and a pass over the nodes with
// it: it is computed afresh for each decision (a balance round, a connect, a
// probe), so a level whose last node fails is left at the next connect.
func (p *Pool) localityScope(nodes []*node, now time.Time) localityScope {
	lp := p.settings.locality
	if lp == nil {
		return localityScope{}
	}
	best := 0
	refill := p.refillWindow().Nanoseconds()
	for _, n := range nodes {
		if n.evicted.Load() || n.draining.Load() ||
			n.conns.Load() == 0 && now.UnixNano()-n.lastSeen.Load() > refill {
			continue
		}
		if nl := n.localityOf(); nl != nil {
			best = max(best, nl.shared)
		}
	}
	s := localityScope{need: preferredShare(lp.levels, best)}
	p.noteLocalityLevel(s.need)
	return s
}

// noteLocalityLevel reports a change of the level in use; the first
// decision is no change.
func (p *Pool) noteLocalityLevel(need int) {
	prev := int(p.localityNeed.Swap(int32(need)+1)) - 1
	if prev >= 0 && prev != need {
		p.obs.localityLevel(p.settings.locality, prev, need)
	}
}

// showLocality asks a node for its own locality: CockroachDB answers on
// any node, with no privilege. Simple protocol: no statement cache slot.
const showLocality = "SHOW LOCALITY"

// learnLocality asks the node behind conn for its locality when the pool
// has a Locality and does not know the node's yet (gossip tells it for
// every node at once when readable): one round trip per node. A server
// that does not know the statement (PostgreSQL) is not asked again; a
// connection-level error is returned, and fails the connect.
func (p *Pool) learnLocality(ctx context.Context, conn *pgx.Conn, n *node) error {
	lp := p.settings.locality
	if lp == nil || n == nil || n.localityOf() != nil {
		return nil
	}
	if nl := p.placement.gossipLocality(n.id); nl != nil {
		if n.setLocality(nl.raw, lp) {
			p.obs.nodeLocality(n.id, nl.raw)
		}
		return nil
	}
	if p.localityUnsupported.Load() || !n.localityAsking.CompareAndSwap(false, true) {
		return nil // the balancer sees to a connection that lands outside
	}
	var raw string
	err := conn.QueryRow(ctx, showLocality, pgx.QueryExecModeSimpleProtocol).Scan(&raw)
	if err != nil {
		n.localityAsking.Store(false)
	}
	var pgErr *pgconn.PgError
	switch {
	case errors.As(err, &pgErr) && (strings.HasPrefix(pgErr.Code, "42") || strings.HasPrefix(pgErr.Code, "0A")):
		// Syntax error, unknown parameter, not supported: not CockroachDB.
		p.localityUnsupported.Store(true)
		return nil
	case err != nil:
		return fmt.Errorf("clusterpool: reading the locality of node %d: %w", n.id, err)
	}
	if n.setLocality(raw, lp) {
		p.obs.nodeLocality(n.id, raw)
	}
	return nil
}

// localityState is the Pool's locality state (see Pool).
type localityState struct {
	// localityUnsupported is set once a server answered SHOW LOCALITY
	// with an error: the pool stops asking.
	localityUnsupported atomic.Bool
	// localityNeed is the level last used (localityScope.need) plus one,
	// 0 before the first decision, so that a change is reported once.
	localityNeed atomic.Int32
}

// gossipLocality returns the locality gossip last gave for node id, which
// the pool may not have reached yet, or nil.
func (pl *placement) gossipLocality(id NodeID) *nodeLocality {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	return pl.gossipLocalities[id]
}

// gossipScope returns, with Config.Locality set, whether a node gossip lists
// is within the locality level in use, by its locality as the pool knows it
// or else as gossip gave it; the returned function must be called with
// pl.mu held. Without Locality it returns nil: every node is.
func (pl *placement) gossipScope() func(NodeID) bool {
	if pl.p.settings.locality == nil {
		return nil
	}
	nodes := pl.p.tracker.nodeList()
	scope := pl.p.localityScope(nodes, time.Now())
	tracked := make(map[NodeID]*node, len(nodes))
	for _, n := range nodes {
		tracked[n.id] = n
	}
	return func(id NodeID) bool {
		if n := tracked[id]; n != nil {
			return scope.in(n)
		}
		return scope.inGossip(pl.gossipLocalities[id])
	}
}
