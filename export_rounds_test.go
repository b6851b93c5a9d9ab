package clusterpool

// BalanceRounds is the number of balancing rounds p has run, for the tests
// in package clusterpool_test that watch a pool over a number of rounds
// rather than for a duration.
func BalanceRounds(p *Pool) int64 { return p.balancer.rounds.Load() }
