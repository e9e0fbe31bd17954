//! kvc's committed word lists, the offline fallback of RULER's `wonderwords` noun, adjective
//! and verb lists ([`super::sources`]), and a deterministic extension with synthetic
//! pronounceable words for common-words extraction past the real words.

/// Adjectives (niah keys are `adjective-noun`, as RULER's `words` keys).
pub const ADJECTIVES: &str = "able acid angry aloof ample ancient arctic awake bad bashful \
basic better bitter black blue bold bored brave brief bright broad broken brown busy calm \
careful cheap cheerful chief chilly clean clever close cloudy clumsy cold common cool crazy \
crisp cruel curly cute damp dark dear deep dense direct dirty dizzy dry dull eager early \
easy elastic empty equal even exact faint fair fancy fast fat fierce final fine firm flat \
fluffy fond foolish fresh friendly frozen full funny gentle giant glad golden good grand \
gray great green grumpy happy hard harsh heavy helpful hidden high hollow honest hot huge \
humble hungry icy idle jolly juicy keen kind large late lazy light little lively lonely \
long loud lovely low loyal lucky mad magic major massive mature meek mellow merry mighty \
mild minor modern moist narrow nasty neat nervous new nice noble noisy normal odd old open \
orange pale plain plastic polite poor proud purple quick quiet rapid rare raw ready red \
rich rigid ripe rough round royal rude rural rusty sad safe salty sandy scary secret sharp \
shiny short shy silent silly simple sleepy slim slow small smart smooth soft solid sour \
spicy steady steep sticky stiff strange strict strong sudden sunny super sweet swift tall \
tame tasty tender thick thin tidy tiny tough tricky ugly upbeat urban vague vast violet \
warm wary weak wealthy wet white whole wide wild wise witty wooden yellow young zany";

/// Nouns.
pub const NOUNS: &str = "actor airport album anchor angle animal answer apple army artist \
atom baby bag bakery ball banana band bank barn basket battery beach bean bear bed bee bell \
belt bench bicycle bird blanket boat body bone book boot bottle box brain branch bread brick \
bridge brother brush bucket button cabin cable cake camera camp candle canoe captain car \
card carpet castle cat cave chain chair cheese cherry chicken child church circle city \
clock cloud coast coat coffee coin comet cook corn cotton country cousin cow crayon crown \
cup curtain dance desert desk diamond doctor dog doll door dragon dream drum duck eagle \
earth egg elbow engine eye face farm feather fence field finger fire fish flag flower \
forest fork fountain frog garden gate ghost gift girl glass glove goat gold grape grass \
guitar hammer hand harbor hat heart hill honey horse hotel house island jacket jar jewel \
kettle key king kitchen kite knee knife ladder lake lamp lemon letter library lion lizard \
lock machine magnet map market meadow medal melon mirror monkey moon mountain mouse music \
nail needle nest night ocean office onion orange owl oyster paint palace pan paper parrot \
pencil piano pillow pilot pipe planet plate pocket pond potato prince puzzle queen rabbit \
radio rain river road robot rock roof rope rose sailor salad sand school sea seed sheep \
shell ship shoe shop silver singer sister snake snow soap sock soldier song spider spoon \
square star station stone storm street sugar sun swan table teacher tent thread throne \
ticket tiger toast tomato tooth tower town toy train tree truck tunnel turtle umbrella \
valley vase village violin wagon wall watch water whale wheel window wing wizard wolf \
worm yard zebra";

/// Verbs (with nouns and adjectives, the common-words pool, as RULER's cwe).
pub const VERBS: &str = "accept admire allow answer argue arrive ask bake balance bathe \
beg behave believe belong bless blink boil borrow bounce breathe build bury buzz calculate \
call carry catch chase cheer chew clap climb collect comb compare complain count cover \
crawl cross cry cycle dance deliver depend describe dig divide drag dream dress drink \
drive drop dust earn eat enjoy enter escape explain fetch fill find fix float fold follow \
forgive gather glow grab greet grin grow guard guess hang harvest hatch help hide hold \
hope hug hunt hurry imagine invent jog join juggle jump kick kneel knit knock laugh lead \
learn lift listen live look march melt mix move nod obey offer open order pack paint \
pause peel pick plant play pour pray print promise pull punch push race rain reach read \
relax remember repair rescue rest ride ring roll rub run rush sail save scream search \
share shine shout sing sink sit skate ski sleep slide smile sneeze snore solve sort spell \
spin spray squeeze stack stare start stay steer stir stretch study swim swing talk teach \
tickle travel trust tumble twist type unite unlock visit wait walk wander wash watch wave \
whisper whistle wink wish wobble wonder work worry write yawn yell zoom";

/// The words of a committed list.
pub(super) fn split(list: &'static str) -> Vec<&'static str> {
    list.split_whitespace().collect()
}

/// `n` synthetic pronounceable words (three consonant-vowel syllables, deterministic), none in
/// `real` (sorted), for common-words extraction past the real words.
pub fn synthetic_words(n: usize, real: &[String]) -> Vec<String> {
    const C: &[u8] = b"bdfgklmnprstvz";
    const V: &[u8] = b"aeiou";
    let syl = |i: usize| -> String {
        let c = C[i % C.len()] as char;
        let w = V[(i / C.len()) % V.len()] as char;
        format!("{c}{w}")
    };
    let n_syl = C.len() * V.len();
    let mut out = Vec::with_capacity(n);
    let mut i = 0usize;
    while out.len() < n {
        // 70^3 = 343,000 words, enumerated with a stride coprime to 70^3 so neighbours
        // differ in their first syllable.
        let k = (i * 7919) % (n_syl * n_syl * n_syl);
        let w = format!(
            "{}{}{}",
            syl(k % n_syl),
            syl((k / n_syl) % n_syl),
            syl(k / (n_syl * n_syl))
        );
        i += 1;
        if real.binary_search(&w).is_err() {
            out.push(w);
        }
    }
    out
}
