package clusterpool

import (
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
)

// The cluster_* parameters of a connection string: each one's parsing into
// Config (setParam), and the error for a name that is none of them, with a
// "did you mean" for a near miss.

// setParam applies one cluster_* connection-string parameter.
func (c *Config) setParam(key, value string) error {
	invalid := func(why any) error {
		return fmt.Errorf("clusterpool: %s: invalid value %q: %v", key, value, why)
	}
	switch key {
	case paramBalanceInterval, paramProbeInterval:
		d, err := time.ParseDuration(value)
		if err != nil {
			return invalid(err)
		}
		if why := checkInterval(d); why != "" {
			return invalid(why)
		}
		if key == paramBalanceInterval {
			c.BalanceInterval = d
		} else {
			c.ProbeInterval = d
		}
	case paramProbeMax:
		if strings.EqualFold(value, paramOff) {
			c.ProbeMaxInterval = offProbeMax
			break
		}
		d, err := time.ParseDuration(value)
		if err != nil {
			return invalid(err)
		}
		if why := checkInterval(d); why != "" {
			return invalid(why + " (or off: no back-off)")
		}
		c.ProbeMaxInterval = d
	case paramMaxRetries:
		if strings.EqualFold(value, paramOff) {
			c.MaxRetries = offMaxRetries
			break
		}
		n, err := strconv.ParseInt(value, 10, 32)
		if err != nil {
			return invalid(err)
		}
		if n < 0 {
			return invalid("must not be negative (0 or off turns retries off)")
		}
		c.MaxRetries = int(n)
		if n == 0 {
			c.MaxRetries = offMaxRetries
		}
	case paramConnectRate:
		if strings.EqualFold(value, paramOff) {
			c.ConnectRate = offConnectRate
			break
		}
		r, err := strconv.ParseFloat(value, 64)
		if err != nil {
			return invalid(err)
		}
		if r < 0 || math.IsNaN(r) {
			return invalid("must be 0 or off (no limit), or more")
		}
		c.ConnectRate = r
		if r == 0 {
			c.ConnectRate = offConnectRate
		}
	case paramMaxConnsPerNode:
		if strings.EqualFold(value, paramOff) {
			c.MaxConnsPerNode = 0
			break
		}
		n, err := strconv.ParseInt(value, 10, 32)
		if err != nil {
			return invalid(err)
		}
		if n < 0 {
			return invalid("must not be negative (0 or off: no cap)")
		}
		c.MaxConnsPerNode = int32(n)
	case paramAcquireTimeout:
		if strings.EqualFold(value, paramOff) {
			c.AcquireTimeout = 0
			break
		}
		d, err := time.ParseDuration(value)
		if err != nil {
			return invalid(err)
		}
		if d < 0 {
			return invalid("must not be negative (0 or off: no timeout)")
		}
		c.AcquireTimeout = d
	case paramNodeIdentity:
		id := NodeIdentity(strings.ToLower(value))
		if id == "" || !id.valid() {
			return invalid("must be auto, backendkey, query or none")
		}
		c.NodeIdentity = id
	case paramLocality:
		if _, err := newLocalityPrefs(value, nil); err != nil {
			return invalid(err)
		}
		c.Locality = value
	case paramLocalityFall:
		if strings.TrimSpace(value) == "" {
			return invalid("must list at least one tier of cluster_locality")
		}
		c.LocalityFallback = strings.Split(value, ",")
	default:
		return unknownParam(key, value)
	}
	return nil
}

// clusterParamNames returns the cluster_* parameters ParseConfig reads.
func clusterParamNames() []string {
	return []string{paramBalanceInterval, paramProbeInterval, paramProbeMax, paramMaxRetries, paramConnectRate, paramNodeIdentity, paramLocality, paramLocalityFall, paramMaxConnsPerNode, paramAcquireTimeout}
}

// unknownParam is the error for a parameter that looks like a cluster
// setting (its lower-cased name starts with "cluster_") but is none. Names
// are case-sensitive, as pgx's are: a case-insensitive match of a known
// name is an error naming the exact spelling, not a quiet synonym, so that
// one spelling works in every tool that reads the string.
func unknownParam(key, value string) error {
	msg := fmt.Sprintf("clusterpool: unknown connection parameter %q (value %q)", key, value)
	lower := strings.ToLower(key)
	best, bestDist := "", 4 // a near miss is at most 3 edits away
	for _, name := range clusterParamNames() {
		if lower == name {
			return fmt.Errorf("%s: cluster parameter names are case-sensitive; write %s", msg, name)
		}
		if d := editDistance(lower, name); d < bestDist {
			best, bestDist = name, d
		}
	}
	if best != "" {
		return fmt.Errorf("%s: did you mean %s?", msg, best)
	}
	return fmt.Errorf("%s: known ones are %s", msg, strings.Join(clusterParamNames(), ", "))
}

// editDistance is the Levenshtein distance between a and b, in bytes.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
